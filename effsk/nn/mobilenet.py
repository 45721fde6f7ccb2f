"""Compound-scaled MobileNetV2 and MobileNetV1 (paper Table 3) from torchvision's building blocks.

MobileNetV2 at phi = 0 is torchvision's ``mobilenet_v2`` exactly (module names, state_dict,
outputs). MobileNetV1 (Howard et al. 2017; torchvision has none) follows the TF-slim reference:
depthwise-separable conv-BN-ReLU6 blocks, 569M multiply-adds and 4.2M parameters at 224.
Depth scales the blocks per stage (``ceil``), width scales every channel count
(``make_divisible(., 8)``), resolution scales the input.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torchvision.models.mobilenetv2 import InvertedResidual
from torchvision.ops import Conv2dNormActivation

from ..scaling import Scaling, resolve, round_channels, round_repeats
from .staged import StagedModel, feature_entry

__all__ = ["MobileNetV2", "MobileNetV1", "mobilenet_v2", "mobilenet_v1"]

#: MobileNetV2 (t, c, n, s): expansion, channels, blocks, stride; stem 32, head 1280.
_V2_STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
_V2_STEM, _V2_HEAD = 32, 1280
#: MobileNetV1 (c, n, s): channels, depthwise-separable blocks, stride of the first; stem 32.
_V1_STAGES = ((64, 1, 1), (128, 2, 2), (256, 2, 2), (512, 6, 2), (1024, 2, 2))
_V1_STEM = 32


class _MobileNet(StagedModel):
    """Shared head of both MobileNets: ``features`` -> pool -> ``classifier`` (Dropout, Linear)."""

    _arch: str

    def __init__(self, scaling: Scaling, num_classes: int, drop_rate: float | None):
        super().__init__()
        if scaling.arch != self._arch:
            raise ValueError(
                f"{type(self).__name__} needs a Scaling for arch={self._arch!r}, got arch={scaling.arch!r}."
            )
        self.scaling = scaling
        self.drop_rate = scaling.dropout if drop_rate is None else float(drop_rate)
        self.num_classes = num_classes

    def _finish(self, features: list[nn.Module], stage_ends: list[int], info: list[dict]) -> None:
        self.features = nn.Sequential(*features)
        self._stage_slices = [slice(a, b) for a, b in zip([0] + stage_ends[:-1], stage_ends)]
        self.feature_info = info
        self.num_features = info[-1]["channels"]
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(p=self.drop_rate), self._make_fc(self.num_classes))
        # torchvision's MobileNetV2 initialisation.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_fc(self, num_classes: int) -> nn.Module:
        if num_classes <= 0:
            return nn.Identity()
        fc = nn.Linear(self.num_features, num_classes)
        nn.init.normal_(fc.weight, 0, 0.01)
        nn.init.zeros_(fc.bias)
        return fc

    def get_classifier(self) -> nn.Module:
        """The final linear layer (``nn.Identity`` when ``num_classes=0``)."""
        return self.classifier[1]

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier with a freshly initialised one of ``num_classes`` outputs."""
        device = next(self.parameters()).device
        self.classifier[1] = self._make_fc(num_classes).to(device)
        self.num_classes = num_classes

    def _feature_stages(self) -> list[nn.Module]:
        return [self.features[s] for s in self._stage_slices]

    def _classify(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.classifier(pooled)


class MobileNetV2(_MobileNet):
    """MobileNetV2 built from a resolved scaling config (see :func:`mobilenet_v2`).

    ``features`` is flat like torchvision's (stem, 17 blocks at phi = 0, head conv);
    ``feature_info`` has one entry per stage (stem, seven block stages, head) whose ``module`` is the
    stage's last entry of ``features``. Parameters as :class:`~effsk.nn.ResNet`.
    """

    _arch = "mobilenet_v2"

    def __init__(self, scaling: Scaling, num_classes: int = 1000, drop_rate: float | None = None, in_chans: int = 3):
        super().__init__(scaling, num_classes, drop_rate)
        norm_layer = partial(nn.BatchNorm2d, eps=scaling.bn_eps, momentum=scaling.bn_momentum)
        conv = partial(Conv2dNormActivation, norm_layer=norm_layer, activation_layer=nn.ReLU6)
        channels = round_channels(_V2_STEM, scaling.width)
        features: list[nn.Module] = [conv(in_chans, channels, stride=2)]
        info = [feature_entry(0, "features.0", channels, 2)]
        stage_ends, reduction = [1], 2
        for expand, out, blocks, stride in _V2_STAGES:
            out = round_channels(out, scaling.width)
            for i in range(round_repeats(blocks, scaling.depth)):
                features.append(InvertedResidual(channels, out, stride if i == 0 else 1, expand, norm_layer))
                channels = out
            reduction *= stride
            stage_ends.append(len(features))
            info.append(feature_entry(len(info), f"features.{len(features) - 1}", out, reduction))
        # torchvision widens the head only for width > 1 (never narrows it).
        head = round_channels(_V2_HEAD, max(1.0, scaling.width))
        features.append(conv(channels, head, kernel_size=1))
        stage_ends.append(len(features))
        info.append(feature_entry(len(info), f"features.{len(features) - 1}", head, reduction))
        self._finish(features, stage_ends, info)


class MobileNetV1(_MobileNet):
    """MobileNetV1 built from a resolved scaling config (see :func:`mobilenet_v1`).

    ``features`` is the stem then one ``nn.Sequential`` per stage of depthwise-separable blocks
    (each ``0``: depthwise 3x3 conv-BN-ReLU6, ``1``: pointwise 1x1 conv-BN-ReLU6); ``feature_info``
    has one entry per ``features`` entry. Parameters as :class:`~effsk.nn.ResNet`.
    """

    _arch = "mobilenet_v1"

    def __init__(self, scaling: Scaling, num_classes: int = 1000, drop_rate: float | None = None, in_chans: int = 3):
        super().__init__(scaling, num_classes, drop_rate)
        norm_layer = partial(nn.BatchNorm2d, eps=scaling.bn_eps, momentum=scaling.bn_momentum)
        conv = partial(Conv2dNormActivation, norm_layer=norm_layer, activation_layer=nn.ReLU6)
        channels = round_channels(_V1_STEM, scaling.width)
        features: list[nn.Module] = [conv(in_chans, channels, stride=2)]
        info = [feature_entry(0, "features.0", channels, 2)]
        reduction = 2
        for out, blocks, stride in _V1_STAGES:
            out = round_channels(out, scaling.width)
            stage = []
            for i in range(round_repeats(blocks, scaling.depth)):
                s = stride if i == 0 else 1
                stage.append(nn.Sequential(conv(channels, channels, stride=s, groups=channels), conv(channels, out, 1)))
                channels = out
            reduction *= stride
            features.append(nn.Sequential(*stage))
            info.append(feature_entry(len(info), f"features.{len(info)}", out, reduction))
        self._finish(features, list(range(1, len(features) + 1)), info)


def mobilenet_v2(
    phi: float = 0,
    *,
    num_classes: int = 1000,
    alpha: float | None = None,
    beta: float | None = None,
    gamma: float | None = None,
    drop_rate: float | None = None,
    in_chans: int = 3,
) -> MobileNetV2:
    """Compound-scaled MobileNetV2 (randomly initialised); phi = 0 is torchvision's ``mobilenet_v2``.

    Examples
    --------
    >>> from effsk.nn import mobilenet_v2
    >>> model = mobilenet_v2(1)
    >>> model.scaling.resolution, model.num_features, [f["channels"] for f in model.feature_info][1:8]
    (258, 1408, [16, 24, 32, 72, 104, 176, 352])
    """
    config = resolve(phi, alpha=alpha, beta=beta, gamma=gamma, arch="mobilenet_v2")
    return MobileNetV2(config, num_classes=num_classes, drop_rate=drop_rate, in_chans=in_chans)


def mobilenet_v1(
    phi: float = 0,
    *,
    num_classes: int = 1000,
    alpha: float | None = None,
    beta: float | None = None,
    gamma: float | None = None,
    drop_rate: float | None = None,
    in_chans: int = 3,
) -> MobileNetV1:
    """Compound-scaled MobileNetV1 (randomly initialised); phi = 2 is paper Table 3's compound model
    (d=1.4, w=1.2, r=1.3).

    Examples
    --------
    >>> from effsk.nn import mobilenet_v1
    >>> model = mobilenet_v1(2)
    >>> model.scaling.resolution, [len(stage) for stage in model.features[1:]]
    (291, [2, 3, 3, 9, 3])
    """
    config = resolve(phi, alpha=alpha, beta=beta, gamma=gamma, arch="mobilenet_v1")
    return MobileNetV1(config, num_classes=num_classes, drop_rate=drop_rate, in_chans=in_chans)
