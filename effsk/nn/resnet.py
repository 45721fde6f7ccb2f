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

from ..scaling import Scaling, resolve, round_channels, round_repeats
from .staged import StagedModel, feature_entry

__all__ = ["ResNet", "resnet50"]

_STEM = 64
#: (planes, blocks, stride) of ResNet-50's four stages.
_RESNET50_STAGES = ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2))


class ResNet(StagedModel):
    """ResNet-50 built from a resolved scaling config (see :func:`resnet50`).

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

    def __init__(self, scaling: Scaling, num_classes: int = 1000, drop_rate: float | None = None, in_chans: int = 3):
        super().__init__()
        if scaling.arch != "resnet50":
            raise ValueError(f"ResNet needs a Scaling for arch='resnet50', got arch={scaling.arch!r}.")
        self.scaling = scaling
        norm_layer = partial(nn.BatchNorm2d, eps=scaling.bn_eps, momentum=scaling.bn_momentum)
        stem = round_channels(_STEM, scaling.width)
        self.conv1 = nn.Conv2d(in_chans, stem, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(stem)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        info = [feature_entry(0, "relu", stem, 2)]
        inplanes, reduction = stem, 4
        for i, (planes, blocks, stride) in enumerate(_RESNET50_STAGES, start=1):
            planes = round_channels(planes, scaling.width)
            layer = _make_layer(inplanes, planes, round_repeats(blocks, scaling.depth), stride, norm_layer)
            setattr(self, f"layer{i}", layer)
            inplanes, reduction = planes * Bottleneck.expansion, reduction * stride
            info.append(feature_entry(i, f"layer{i}", inplanes, reduction))
        self.feature_info = info
        self.num_features = inplanes
        self.drop_rate = scaling.dropout if drop_rate is None else float(drop_rate)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        # A parameter-free module, so the state_dict stays torchvision's.
        self.head_drop = nn.Dropout(self.drop_rate)
        self.fc = self._make_fc(num_classes)
        self.num_classes = num_classes
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_fc(self, num_classes: int) -> nn.Module:
        # torchvision keeps nn.Linear's default initialisation for the ResNet classifier.
        return nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def get_classifier(self) -> nn.Module:
        """The final linear layer (``nn.Identity`` when ``num_classes=0``)."""
        return self.fc

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier with a freshly initialised one of ``num_classes`` outputs."""
        device = next(self.parameters()).device
        self.fc = self._make_fc(num_classes).to(device)
        self.num_classes = num_classes

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


def _make_layer(inplanes: int, planes: int, blocks: int, stride: int, norm_layer) -> nn.Sequential:
    """torchvision's ``ResNet._make_layer`` for Bottleneck, without its fixed channel plan."""
    out = planes * Bottleneck.expansion
    downsample = None
    if stride != 1 or inplanes != out:
        downsample = nn.Sequential(conv1x1(inplanes, out, stride), norm_layer(out))
    layers = [Bottleneck(inplanes, planes, stride, downsample, norm_layer=norm_layer)]
    layers += [Bottleneck(out, planes, norm_layer=norm_layer) for _ in range(1, blocks)]
    return nn.Sequential(*layers)


def resnet50(
    phi: float = 0,
    *,
    num_classes: int = 1000,
    alpha: float | None = None,
    beta: float | None = None,
    gamma: float | None = None,
    drop_rate: float | None = None,
    in_chans: int = 3,
) -> ResNet:
    """Compound-scaled ResNet-50 (randomly initialised); phi = 0 is torchvision's ``resnet50``.

    Examples
    --------
    >>> from effsk.nn import resnet50
    >>> model = resnet50(1)
    >>> model.scaling.resolution, [len(model.get_submodule(f"layer{i}")) for i in range(1, 5)]
    (258, [4, 5, 8, 4])
    """
    config = resolve(phi, alpha=alpha, beta=beta, gamma=gamma, arch="resnet50")
    return ResNet(config, num_classes=num_classes, drop_rate=drop_rate, in_chans=in_chans)
