"""Compound-scaled ResNet-50 (paper Table 3) from torchvision's Bottleneck block.

phi = 0 is torchvision's ``resnet50`` exactly (module names, state_dict, outputs). Depth scales the
blocks per stage (``ceil``), width scales the stem and every stage's planes (``make_divisible(., 8)``;
the block's 4x expansion is kept), resolution scales the input.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torchvision.models.resnet import Bottleneck, conv1x1

from ..scaling import Scaling, StageSpec, round_channels, round_repeats
from .builder import feature_info, stage_blocks
from .staged import StagedModel

__all__ = ["ResNet"]

_STEM = 64
#: (planes, blocks, stride) of ResNet-50's four stages; a Bottleneck's output is 4 x its planes.
_RESNET50_STAGES = ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2))


class ResNet(StagedModel):
    """ResNet-50 built from a resolved scaling config (see :func:`~effsk.nn.resnet50`).

    Parameters
    ----------
    scaling : Scaling
        Resolved configuration with ``arch="resnet50"`` (see :func:`effsk.scaling.resolve`).
    num_classes : int, default=1000
        Size of the classifier; 0 gives a model whose head returns pooled features.
    drop_rate : float, optional
        Dropout before the classifier; defaults to the config's (0, like torchvision).
    in_chans : int, default=3
        Input channels.

    Attributes
    ----------
    feature_info : list of dict
        Stem (after ``relu``) and ``layer1``..``layer4``: ``index``, ``module``, ``channels``,
        ``reduction``.
    num_features : int
        Width of the pooled features fed to ``fc``.
    """

    arch = "resnet50"

    def __init__(self, scaling: Scaling, num_classes: int = 1000, drop_rate: float | None = None, in_chans: int = 3):
        super().__init__(scaling, num_classes, drop_rate)
        norm_layer = partial(nn.BatchNorm2d, eps=scaling.bn_eps, momentum=scaling.bn_momentum)
        stem = round_channels(_STEM, scaling.width)
        self.conv1 = nn.Conv2d(in_chans, stem, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(stem)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        specs = _scaled_stages(stem, scaling)
        for i, blocks in enumerate(stage_blocks(specs, partial(_bottleneck, norm_layer=norm_layer)), start=1):
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
        self.feature_info = feature_info(
            ["relu", "layer1", "layer2", "layer3", "layer4"],
            channels=[stem, *(s.out_channels for s in specs)],
            strides=[2, 2 * specs[0].stride, *(s.stride for s in specs[1:])],  # layer1 runs after maxpool
        )
        self.num_features = specs[-1].out_channels
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        # A parameter-free module, so the state_dict stays torchvision's.
        self.head_drop = nn.Dropout(self.drop_rate)
        self.fc = self._make_fc(num_classes)
        self._init_weights()

    def get_classifier(self) -> nn.Module:
        """The final linear layer (``nn.Identity`` when ``num_classes=0``)."""
        return self.fc

    def _set_classifier(self, fc: nn.Module) -> None:
        self.fc = fc

    def _feature_stages(self) -> list[nn.Module]:
        return [
            nn.Sequential(self.conv1, self.bn1, self.relu),
            nn.Sequential(self.maxpool, self.layer1),
            self.layer2,
            self.layer3,
            self.layer4,
        ]

    def _classify(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.fc(self.head_drop(pooled))


def _scaled_stages(stem: int, scaling: Scaling) -> list[StageSpec]:
    """ResNet-50's stages as StageSpecs: width scales the planes (the 4x expansion stays), depth the blocks."""
    specs, in_channels = [], stem
    for planes, blocks, stride in _RESNET50_STAGES:
        out = round_channels(planes, scaling.width) * Bottleneck.expansion
        specs.append(StageSpec(Bottleneck.expansion, 3, stride, in_channels, out, round_repeats(blocks, scaling.depth)))
        in_channels = out
    return specs


def _bottleneck(spec: StageSpec, in_channels: int, stride: int, index: int, *, norm_layer) -> Bottleneck:
    """torchvision's ``ResNet._make_layer`` rule: a projection shortcut where width or stride change."""
    downsample = None
    if stride != 1 or in_channels != spec.out_channels:
        downsample = nn.Sequential(conv1x1(in_channels, spec.out_channels, stride), norm_layer(spec.out_channels))
    planes = spec.out_channels // spec.expand_ratio
    return Bottleneck(in_channels, planes, stride, downsample, norm_layer=norm_layer)
