"""EfficientNet (B0..B7, any phi, Lite) built from a :class:`~effsk.scaling.Scaling`.

Module names follow torchvision's ``efficientnet_bK`` exactly (``features.S.I.block.K``,
``classifier.1``), so torchvision state_dicts load unchanged and outputs match for the same weights.
"""

from __future__ import annotations

from functools import partial
from typing import Sequence

import torch
from torch import nn

from ..scaling import Scaling, resolve
from .blocks import Conv2dSame, ConvBNAct, MBConv

__all__ = ["EfficientNet", "efficientnet"]


class EfficientNet(nn.Module):
    """An EfficientNet built from a resolved scaling config.

    Parameters
    ----------
    scaling : Scaling
        Resolved configuration (see :func:`effsk.scaling.resolve`).
    num_classes : int, default=1000
        Size of the classifier; 0 gives a model whose head returns pooled features.
    drop_rate : float, optional
        Classifier dropout; defaults to the variant's published dropout.
    drop_path_rate : float, default=0.2
        Stochastic depth rate of the last block (block i of N drops with rate * i / N).
    in_chans : int, default=3
        Input channels.
    same_padding : bool, default=False
        TF-style "same" padding in every convolution (needed by TF-trained weights).

    Attributes
    ----------
    feature_info : list of dict
        For each entry of ``features`` (stem, the seven stages, head conv): ``index``, ``module``,
        ``channels`` and ``reduction`` (stride relative to the input).
    num_features : int
        Width of the pooled features fed to the classifier.
    """

    def __init__(
        self,
        scaling: Scaling,
        num_classes: int = 1000,
        drop_rate: float | None = None,
        drop_path_rate: float = 0.2,
        in_chans: int = 3,
        same_padding: bool = False,
    ):
        super().__init__()
        self.scaling = scaling
        self.same_padding = same_padding
        norm_layer = partial(nn.BatchNorm2d, eps=scaling.bn_eps, momentum=scaling.bn_momentum)
        activation = nn.ReLU6 if scaling.lite else nn.SiLU
        conv_layer = Conv2dSame if same_padding else nn.Conv2d
        conv = partial(ConvBNAct, norm_layer=norm_layer, activation_layer=activation, conv_layer=conv_layer)

        stages = scaling.stages
        total_blocks = sum(s.repeats for s in stages)
        layers: list[nn.Module] = [conv(in_chans, scaling.stem_channels, 3, 2)]
        info = [dict(index=0, module="features.0", channels=scaling.stem_channels, reduction=2)]
        block_id, reduction = 0, 2
        for spec in stages:
            blocks = []
            for i in range(spec.repeats):
                blocks.append(
                    MBConv(
                        spec.in_channels if i == 0 else spec.out_channels,
                        spec.out_channels,
                        spec.kernel,
                        spec.stride if i == 0 else 1,
                        spec.expand_ratio,
                        drop_path_rate * block_id / total_blocks,
                        norm_layer=norm_layer,
                        activation_layer=activation,
                        squeeze_excite=not scaling.lite,
                        conv_layer=conv_layer,
                    )
                )
                block_id += 1
            reduction *= spec.stride
            layers.append(nn.Sequential(*blocks))
            info.append(dict(index=len(info), module=f"features.{len(info)}", channels=spec.out_channels, reduction=reduction))
        layers.append(conv(stages[-1].out_channels, scaling.head_channels, 1))
        info.append(dict(index=len(info), module=f"features.{len(info)}", channels=scaling.head_channels, reduction=reduction))

        self.features = nn.Sequential(*layers)
        self.feature_info = info
        self.num_features = scaling.head_channels
        self.drop_rate = scaling.dropout if drop_rate is None else float(drop_rate)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = self._make_classifier(num_classes)
        self.num_classes = num_classes
        self._init_weights()

    def _make_classifier(self, num_classes: int) -> nn.Sequential:
        fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        return nn.Sequential(nn.Dropout(p=self.drop_rate, inplace=True), fc)

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                self._init_linear(m)

    @staticmethod
    def _init_linear(m: nn.Linear) -> None:
        bound = 1.0 / m.out_features**0.5
        nn.init.uniform_(m.weight, -bound, bound)
        nn.init.zeros_(m.bias)

    def get_classifier(self) -> nn.Module:
        """The final linear layer (``nn.Identity`` when ``num_classes=0``)."""
        return self.classifier[1]

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier with a freshly initialised one of ``num_classes`` outputs."""
        device = next(self.parameters()).device
        self.classifier = self._make_classifier(num_classes).to(device)
        if num_classes > 0:
            self._init_linear(self.classifier[1])
        self.num_classes = num_classes

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Feature map after the head convolution, ``(N, num_features, H/32, W/32)``."""
        return self.features(x)

    def forward_intermediates(self, x: torch.Tensor, indices: Sequence[int]) -> list[torch.Tensor]:
        """Feature maps after the given ``features`` entries (see ``feature_info``), in that order."""
        wanted = sorted(set(int(i) for i in indices))
        if not wanted or wanted[0] < 0 or wanted[-1] >= len(self.features):
            raise ValueError(f"stage indices must lie in 0..{len(self.features) - 1}, got {list(indices)}")
        maps = {}
        for i, module in enumerate(self.features[: wanted[-1] + 1]):
            x = module(x)
            if i in wanted:
                maps[i] = x
        return [maps[int(i)] for i in indices]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool the feature map; return pooled features if ``pre_logits`` else logits."""
        x = torch.flatten(self.avgpool(x), 1)
        return x if pre_logits else self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def efficientnet(
    phi="b0",
    *,
    num_classes: int = 1000,
    scaling: str = "official",
    alpha: float | None = None,
    beta: float | None = None,
    gamma: float | None = None,
    drop_rate: float | None = None,
    drop_path_rate: float = 0.2,
    in_chans: int = 3,
    same_padding: bool = False,
) -> EfficientNet:
    """Build an EfficientNet for any phi (randomly initialised; see :mod:`effsk.weights` to fill it).

    Examples
    --------
    >>> from effsk.nn import efficientnet
    >>> model = efficientnet("b0")
    >>> model.num_features, sum(p.numel() for p in model.parameters())
    (1280, 5288548)
    >>> [f["channels"] for f in model.feature_info][1:8]
    [16, 24, 40, 80, 112, 192, 320]
    """
    bases = {k: v for k, v in (("alpha", alpha), ("beta", beta), ("gamma", gamma)) if v is not None}
    config = resolve(phi, scaling=scaling, **bases)
    return EfficientNet(
        config,
        num_classes=num_classes,
        drop_rate=drop_rate,
        drop_path_rate=drop_path_rate,
        in_chans=in_chans,
        same_padding=same_padding,
    )
