"""timm's EfficientNet key layout (``conv_stem``, ``blocks.S.I.conv_dw``, ``conv_head``, ``classifier``)
and its converter to effsk's torchvision layout.

timm republishes the paper's TF checkpoints (``tf_efficientnet_bK.aa_in1k``), AdvProp (``.ap_in1k``)
and Noisy Student (``.ns_jft_in1k``) weights, and the Lite ones (``tf_efficientnet_liteK``), as
safetensors on the Hugging Face Hub, in this layout. Blocks of an expand-ratio-1 stage are
``DepthwiseSeparableConv`` (depthwise, squeeze-excite, projection), the others ``InvertedResidual``
(expansion, depthwise, squeeze-excite, projection; Lite: no squeeze-excite); their layers map onto the
positions of effsk's MBConv ``block`` Sequential.
"""

from __future__ import annotations

import re

from ..scaling import Scaling

__all__ = ["is_timm_layout", "convert_timm_state_dict"]

_SQUEEZE_EXCITE = None  # stands for timm's se.conv_reduce / se.conv_expand in the lists below


def _block_positions(expanded: bool, squeeze_excite: bool) -> dict[str, str]:
    """timm layer name inside a block -> position in effsk's MBConv ``block`` Sequential, which holds
    [expansion], depthwise, [squeeze-excite], projection in that order."""
    if expanded:  # timm's InvertedResidual
        layers = [("conv_pw", "bn1"), ("conv_dw", "bn2"), _SQUEEZE_EXCITE, ("conv_pwl", "bn3")]
    else:  # timm's DepthwiseSeparableConv
        layers = [("conv_dw", "bn1"), _SQUEEZE_EXCITE, ("conv_pw", "bn2")]
    if not squeeze_excite:
        layers.remove(_SQUEEZE_EXCITE)
    positions = {}
    for i, layer in enumerate(layers):
        if layer is _SQUEEZE_EXCITE:
            positions.update({"se.conv_reduce": f"{i}.fc1", "se.conv_expand": f"{i}.fc2"})
        else:
            positions.update({layer[0]: f"{i}.0", layer[1]: f"{i}.1"})
    return positions


_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.(\d+)\.(.+)\.(\w+)$")


def is_timm_layout(state_dict) -> bool:
    """Whether ``state_dict`` uses timm's EfficientNet key layout (``conv_stem.weight``, ``blocks.0.0...``)."""
    return "conv_stem.weight" in state_dict and any(k.startswith("blocks.0.0.") for k in state_dict)


def convert_timm_state_dict(state_dict, scaling: Scaling) -> dict:
    """Rename a timm-layout EfficientNet state_dict to effsk's torchvision layout.

    Parameters
    ----------
    state_dict : mapping of str to Tensor
        Keys such as ``conv_stem.weight``, ``blocks.1.0.conv_pwl.weight``, ``classifier.bias``.
    scaling : Scaling
        The EfficientNet variant the weights belong to; its stages place each block.

    Returns
    -------
    dict
        The same tensors under effsk's keys (``features.0.0.weight``, ``features.2.0.block.3.0.weight``,
        ``classifier.1.bias``).

    Raises
    ------
    ValueError
        ``scaling`` is not an EfficientNet, or a key has no place in it (a stage or block beyond the
        variant's, an unknown layer), naming the key.
    """
    if scaling.arch != "efficientnet":
        raise ValueError(f"only EfficientNets take this layout, not {scaling.label}")
    stages = scaling.stages
    head = len(stages) + 1
    fixed = {"conv_stem": "features.0.0", "bn1": "features.0.1", "conv_head": f"features.{head}.0",
             "bn2": f"features.{head}.1", "classifier": "classifier.1"}
    converted = {}
    for key, tensor in state_dict.items():
        match = _BLOCK_KEY.match(key)
        if match is None:
            layer, _, param = key.rpartition(".")
            if layer not in fixed:
                raise ValueError(f"key {key!r} has no counterpart in an EfficientNet")
            converted[f"{fixed[layer]}.{param}"] = tensor
            continue
        stage, index, layer, param = int(match[1]), int(match[2]), match[3], match[4]
        if stage >= len(stages) or index >= stages[stage].repeats:
            raise ValueError(f"key {key!r}: block {stage}.{index} does not exist in {scaling.label}")
        names = _block_positions(stages[stage].expand_ratio != 1, not scaling.lite)
        if layer not in names:
            raise ValueError(f"key {key!r}: layer {layer!r} has no counterpart in an EfficientNet block")
        converted[f"features.{stage + 1}.{index}.block.{names[layer]}.{param}"] = tensor
    return converted
