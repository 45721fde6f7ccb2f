"""Compound-scaled MobileNetV2 and MobileNetV1 (paper Table 3) from torchvision's building blocks.

MobileNetV2 at phi = 0 is torchvision's ``mobilenet_v2`` exactly (module names, state_dict,
outputs). MobileNetV1 (Howard et al. 2017; torchvision has none) follows the TF-slim reference:
depthwise-separable conv-BN-ReLU6 blocks, 569M multiply-adds and 4.2M parameters at 224.
Depth scales the blocks per stage (``ceil``), width scales every channel count
(``make_divisible(., 8)``), resolution scales the input.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

from torch import nn
from torchvision.models.mobilenetv2 import InvertedResidual
from torchvision.ops import Conv2dNormActivation

from ..scaling import Scaling, StageSpec, round_channels
from .builder import chain_stages, scale_stages, stage_blocks
from .staged import SequentialStagedModel

__all__ = ["MobileNetV2", "MobileNetV1"]

#: MobileNetV2, paper Table 2: (expansion t, kernel, stride s, channels c, blocks n) after a 32-channel stem.
_V2_STAGES = chain_stages(32, [(1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 3, 2, 32, 3), (6, 3, 2, 64, 4), (6, 3, 1, 96, 3),
                               (6, 3, 2, 160, 3), (6, 3, 1, 320, 1)])
_V2_HEAD = 1280
#: MobileNetV1, paper Table 1: depthwise-separable 3x3 blocks (no expansion) after a 32-channel stem.
_V1_STAGES = chain_stages(32, [(1, 3, 1, 64, 1), (1, 3, 2, 128, 2), (1, 3, 2, 256, 2), (1, 3, 2, 512, 6),
                               (1, 3, 2, 1024, 2)])

_ConvFactory = Callable[..., Conv2dNormActivation]


class _MobileNet(SequentialStagedModel):
    """Both MobileNets: a conv-BN-ReLU6 stem, the scaled stage table (``_body``), an optional head
    conv (``_head``), then torchvision's MobileNetV2 classifier and initialisation."""

    _base_stages: tuple[StageSpec, ...]

    def __init__(self, scaling: Scaling, num_classes: int = 1000, drop_rate: float | None = None, in_chans: int = 3):
        super().__init__(scaling, num_classes, drop_rate)
        norm_layer = partial(nn.BatchNorm2d, eps=scaling.bn_eps, momentum=scaling.bn_momentum)
        conv = partial(Conv2dNormActivation, norm_layer=norm_layer, activation_layer=nn.ReLU6)
        specs = scale_stages(self._base_stages, scaling.width, scaling.depth)
        stem = conv(in_chans, specs[0].in_channels, stride=2)
        body = self._body(specs, conv, norm_layer)
        head = self._head(specs[-1].out_channels, conv)
        self._set_stages(
            [[stem], *body, *([m] for m in head)],
            channels=[specs[0].in_channels, *(s.out_channels for s in specs), *(m.out_channels for m in head)],
            strides=[2, *(s.stride for s in specs), *(1 for _ in head)],
        )
        self.classifier = self._make_classifier()
        self._init_weights()

    def _body(self, specs, conv: _ConvFactory, norm_layer) -> list[list[nn.Module]]:
        """The modules of each block stage (each list becomes one ``feature_info`` stage)."""
        raise NotImplementedError

    def _head(self, in_channels: int, conv: _ConvFactory) -> list[Conv2dNormActivation]:
        """The head conv, if the network has one (its own ``feature_info`` stage)."""
        return []

    def _init_fc(self, fc: nn.Linear) -> None:
        # torchvision's MobileNetV2: normal(0, 0.01), zero bias.
        nn.init.normal_(fc.weight, 0, 0.01)
        nn.init.zeros_(fc.bias)


class MobileNetV2(_MobileNet):
    """MobileNetV2 built from a resolved scaling config (see :func:`~effsk.nn.mobilenet_v2`).

    ``features`` is flat like torchvision's (stem, 17 blocks at phi = 0, head conv);
    ``feature_info`` has one entry per stage (stem, seven block stages, head) whose ``module`` is the
    stage's last entry of ``features``. Parameters as :class:`~effsk.nn.ResNet`.
    """

    arch = "mobilenet_v2"
    _base_stages = _V2_STAGES

    def _body(self, specs, conv: _ConvFactory, norm_layer) -> list[list[nn.Module]]:
        def inverted_residual(spec: StageSpec, in_channels: int, stride: int, index: int) -> nn.Module:
            return InvertedResidual(in_channels, spec.out_channels, stride, spec.expand_ratio, norm_layer)

        return stage_blocks(specs, inverted_residual)

    def _head(self, in_channels: int, conv: _ConvFactory) -> list[Conv2dNormActivation]:
        # torchvision widens the head only for width > 1 (never narrows it).
        return [conv(in_channels, round_channels(_V2_HEAD, max(1.0, self.scaling.width)), kernel_size=1)]


class MobileNetV1(_MobileNet):
    """MobileNetV1 built from a resolved scaling config (see :func:`~effsk.nn.mobilenet_v1`).

    ``features`` is the stem then one ``nn.Sequential`` per stage of depthwise-separable blocks
    (each ``0``: depthwise 3x3 conv-BN-ReLU6, ``1``: pointwise 1x1 conv-BN-ReLU6); ``feature_info``
    has one entry per ``features`` entry. Parameters as :class:`~effsk.nn.ResNet`.
    """

    arch = "mobilenet_v1"
    _base_stages = _V1_STAGES

    def _body(self, specs, conv: _ConvFactory, norm_layer) -> list[list[nn.Module]]:
        def separable(spec: StageSpec, in_channels: int, stride: int, index: int) -> nn.Module:
            depthwise = conv(in_channels, in_channels, stride=stride, groups=in_channels)
            return nn.Sequential(depthwise, conv(in_channels, spec.out_channels, 1))

        return [[nn.Sequential(*blocks)] for blocks in stage_blocks(specs, separable)]
