"""The model interface every effsk network shares (timm's: ``num_features``, ``feature_info``,
``forward_features`` / ``forward_intermediates`` / ``forward_head``, ``reset_classifier``).

A model lists its ``feature_info`` entries as a chain of stages; :class:`StagedModel` derives the
forward passes from that chain and the classifier handling from two hooks, so estimators treat
every arch alike. :class:`SequentialStagedModel` is the torchvision EfficientNet / MobileNet layout:
one ``features`` Sequential (stem to head conv) and a ``classifier`` of Dropout then Linear.
"""

from __future__ import annotations

from itertools import accumulate
from typing import ClassVar, Sequence

import torch
from torch import nn

from ..scaling import Scaling
from .builder import feature_info

__all__ = ["StagedModel", "SequentialStagedModel"]


class StagedModel(nn.Module):
    """Base of every effsk network, built from a resolved :class:`~effsk.scaling.Scaling`.

    Subclasses set ``arch``, build their modules, set ``feature_info``, ``num_features`` and
    ``avgpool``, call :meth:`_init_weights` last, and implement ``_feature_stages`` (one module per
    ``feature_info`` entry, applied in order), ``_classify`` (pooled features -> logits),
    ``get_classifier`` and ``_set_classifier``. ``_init_fc`` initialises a new classifier layer
    (default: ``nn.Linear``'s own initialisation, as torchvision's ResNet).
    """

    #: The :attr:`Scaling.arch <effsk.scaling.Scaling>` this class builds.
    arch: ClassVar[str]
    feature_info: list[dict]
    num_features: int

    def __init__(self, scaling: Scaling, num_classes: int, drop_rate: float | None):
        super().__init__()
        if scaling.arch != self.arch:
            raise ValueError(
                f"{type(self).__name__} needs a Scaling for arch={self.arch!r}, got arch={scaling.arch!r}."
            )
        self.scaling = scaling
        self.num_classes = num_classes
        self.drop_rate = scaling.dropout if drop_rate is None else float(drop_rate)

    def _feature_stages(self) -> list[nn.Module]:
        raise NotImplementedError

    def _classify(self, pooled: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def get_classifier(self) -> nn.Module:
        """The final linear layer (``nn.Identity`` when ``num_classes=0``)."""
        raise NotImplementedError

    def _set_classifier(self, fc: nn.Module) -> None:
        raise NotImplementedError

    def _init_fc(self, fc: nn.Linear) -> None:
        pass

    def _make_fc(self, num_classes: int) -> nn.Module:
        return nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier with a freshly initialised one of ``num_classes`` outputs."""
        device = next(self.parameters()).device
        fc = self._make_fc(num_classes)
        if isinstance(fc, nn.Linear):
            self._init_fc(fc)
        self._set_classifier(fc.to(device))
        self.num_classes = num_classes

    def _init_weights(self) -> None:
        """torchvision's initialisation, in module order (so a seeded build draws what torchvision's does)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                self._init_fc(m)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Last feature map, ``(N, num_features, H/32, W/32)``."""
        for stage in self._feature_stages():
            x = stage(x)
        return x

    def forward_intermediates(self, x: torch.Tensor, indices: Sequence[int]) -> list[torch.Tensor]:
        """Feature maps after the given ``feature_info`` entries, in that order."""
        stages = self._feature_stages()
        wanted = sorted(set(int(i) for i in indices))
        if not wanted or wanted[0] < 0 or wanted[-1] >= len(stages):
            raise ValueError(f"stage indices must lie in 0..{len(stages) - 1}, got {list(indices)}")
        maps = {}
        for i, stage in enumerate(stages[: wanted[-1] + 1]):
            x = stage(x)
            if i in wanted:
                maps[i] = x
        return [maps[int(i)] for i in indices]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool the feature map; return pooled features if ``pre_logits`` else logits."""
        x = torch.flatten(self.avgpool(x), 1)
        return x if pre_logits else self._classify(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class SequentialStagedModel(StagedModel):
    """torchvision's EfficientNet / MobileNet layout: ``features`` holds stem, block stages and head
    conv back to back; ``classifier`` is ``(Dropout, Linear)``.

    Subclasses pass their stages to :meth:`_set_stages`, then set ``classifier`` (see
    :meth:`_make_classifier`) and call :meth:`_init_weights`.
    """

    def _set_stages(
        self, stages: Sequence[Sequence[nn.Module]], channels: Sequence[int], strides: Sequence[int]
    ) -> None:
        """Lay ``stages`` (the modules of each ``feature_info`` entry) out flat in ``features``."""
        ends = list(accumulate(len(stage) for stage in stages))
        self.features = nn.Sequential(*(m for stage in stages for m in stage))
        self._stage_slices = [slice(start, end) for start, end in zip([0, *ends[:-1]], ends)]
        self.feature_info = feature_info([f"features.{end - 1}" for end in ends], channels, strides)
        self.num_features = channels[-1]
        self.avgpool = nn.AdaptiveAvgPool2d(1)

    def _make_classifier(self, inplace_dropout: bool = False) -> nn.Sequential:
        return nn.Sequential(nn.Dropout(p=self.drop_rate, inplace=inplace_dropout), self._make_fc(self.num_classes))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Feature map after the head convolution, ``(N, num_features, H/32, W/32)``."""
        # ``features`` as one call, so an optimised copy may swap in a compiled Sequential.
        return self.features(x)

    def _feature_stages(self) -> list[nn.Module]:
        return [self.features[s] for s in self._stage_slices]

    def _classify(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.classifier(pooled)

    def get_classifier(self) -> nn.Module:
        """The final linear layer (``nn.Identity`` when ``num_classes=0``)."""
        return self.classifier[1]

    def _set_classifier(self, fc: nn.Module) -> None:
        self.classifier[1] = fc

