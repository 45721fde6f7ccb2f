"""The model interface the compound-scaled baselines share with :class:`~effsk.nn.EfficientNet`.

A baseline lists its ``feature_info`` entries as a chain of module groups; this mixin derives
``forward_features``, ``forward_intermediates``, ``forward_head`` and ``forward`` from that chain,
so estimators treat every arch alike (timm's interface: ``num_features``, ``reset_classifier``).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

__all__ = ["StagedModel"]


class StagedModel(nn.Module):
    """Base of the baselines: subclasses set ``feature_info``, ``num_features``, ``avgpool``, and
    implement ``_feature_stages`` (one module per ``feature_info`` entry, applied in order),
    ``_classify`` (pooled features -> logits) and ``reset_classifier``."""

    feature_info: list[dict]
    num_features: int

    def _feature_stages(self) -> list[nn.Module]:
        raise NotImplementedError

    def _classify(self, pooled: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def reset_classifier(self, num_classes: int) -> None:
        raise NotImplementedError

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


def feature_entry(index: int, module: str, channels: int, reduction: int) -> dict:
    """One ``feature_info`` row, keyed like :class:`~effsk.nn.EfficientNet`'s."""
    return dict(index=index, module=module, channels=channels, reduction=reduction)
