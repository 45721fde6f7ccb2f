"""Building blocks of the EfficientNet family.

torchvision.ops supplies conv-BN-activation, squeeze-excite and stochastic depth; effsk adds the
MBConv block that composes them (with torchvision's module names, so state_dicts interchange) and
the TF-style "same" convolution that published TF-trained weights (EfficientNet-Lite) need.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import SqueezeExcitation, StochasticDepth
from torchvision.ops.misc import ConvNormActivation

from ..scaling import make_divisible

__all__ = ["Conv2dSame", "ConvBNAct", "MBConv"]


class Conv2dSame(nn.Conv2d):
    """Conv2d with TensorFlow's ``padding="SAME"``: pad so that out = ceil(in / stride),
    with the odd pixel at the bottom/right. Parameters and state_dict equal ``nn.Conv2d``'s."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=None, dilation=1, groups=1, bias=True):
        # ``padding`` is accepted for signature compatibility and ignored: it is computed per input.
        super().__init__(in_channels, out_channels, kernel_size, stride, 0, dilation, groups, bias)

    @staticmethod
    def _pad(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
        total = max((math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
        return total // 2, total - total // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2:]
        top, bottom = self._pad(ih, self.kernel_size[0], self.stride[0], self.dilation[0])
        left, right = self._pad(iw, self.kernel_size[1], self.stride[1], self.dilation[1])
        if top or bottom or left or right:
            x = F.pad(x, (left, right, top, bottom))
        return super().forward(x)


class ConvBNAct(ConvNormActivation):
    """torchvision's conv -> norm -> activation (keys ``0``, ``1``), optionally with "same" padding."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
        *,
        norm_layer: Callable[..., nn.Module] = nn.BatchNorm2d,
        activation_layer: Callable[..., nn.Module] | None = nn.SiLU,
        conv_layer: type[nn.Conv2d] = nn.Conv2d,
    ):
        super().__init__(
            in_channels,
            out_channels,
            kernel_size=kernel_size,
            stride=stride,
            groups=groups,
            norm_layer=norm_layer,
            activation_layer=activation_layer,
            conv_layer=conv_layer,
        )


class MBConv(nn.Module):
    """Mobile inverted bottleneck with optional squeeze-excite (paper Table 1's MBConv).

    1x1 expand (skipped for ratio 1) -> depthwise kxk -> squeeze-excite -> 1x1 project, with stochastic
    depth on the identity residual when stride is 1 and channels are unchanged.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int,
        stride: int,
        expand_ratio: int,
        drop_path: float,
        *,
        norm_layer: Callable[..., nn.Module],
        activation_layer: Callable[..., nn.Module],
        squeeze_excite: bool = True,
        conv_layer: type[nn.Conv2d] = nn.Conv2d,
    ):
        super().__init__()
        self.use_res_connect = stride == 1 and in_channels == out_channels
        conv = partial(ConvBNAct, norm_layer=norm_layer, conv_layer=conv_layer)
        expanded = make_divisible(in_channels * expand_ratio, 8)
        layers: list[nn.Module] = []
        if expanded != in_channels:
            layers.append(conv(in_channels, expanded, 1, activation_layer=activation_layer))
        layers.append(conv(expanded, expanded, kernel, stride, groups=expanded, activation_layer=activation_layer))
        if squeeze_excite:
            squeeze = max(1, in_channels // 4)
            layers.append(SqueezeExcitation(expanded, squeeze, activation=partial(nn.SiLU, inplace=True)))
        layers.append(conv(expanded, out_channels, 1, activation_layer=None))
        self.block = nn.Sequential(*layers)
        self.stochastic_depth = StochasticDepth(drop_path, "row")
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        if self.use_res_connect:
            out = self.stochastic_depth(out) + x
        return out
