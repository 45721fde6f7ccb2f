"""Where weights come from: published ImageNet weights (torchvision's, via its weights enums)."""

from __future__ import annotations

import os

import torch
from torchvision.models import get_model_weights

from .scaling import Scaling, resolve

__all__ = ["torchvision_weights", "imagenet_cache_path", "imagenet_weights_status"]


def torchvision_weights(phi):
    """torchvision's ImageNet weights enum entry for a published b0..b7, else ``None``."""
    s = resolve(phi)
    if s.name is None or s.lite:
        return None
    return get_model_weights(f"efficientnet_{s.name}").IMAGENET1K_V1


def imagenet_cache_path(weights) -> str:
    """Where torch.hub puts (and finds) a downloaded weights file; honours ``TORCH_HOME``."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))


def imagenet_weights_status(phi: Scaling | str | float) -> str:
    """``"cached"`` if ImageNet weights are on this machine, ``"download"`` if published but not
    cached, ``"-"`` when no published weights exist for that variant."""
    weights = torchvision_weights(phi)
    if weights is None:
        return "-"
    return "cached" if os.path.isfile(imagenet_cache_path(weights)) else "download"


def build_model(
    phi,
    weights=None,
    *,
    num_classes: int = 1000,
    scaling: str = "official",
    alpha: float | None = None,
    beta: float | None = None,
    gamma: float | None = None,
    drop_rate: float | None = None,
    drop_path_rate: float = 0.2,
):
    """Build ``efficientnet(phi, ...)`` and fill it from ``weights``.

    Returns ``(model, preprocessing)``: the preprocessing that belongs to those weights.
    ``weights=None`` gives a random init with the variant's default preprocessing.

    This is the one seam through which every estimator gets a model.
    """
    from .nn import efficientnet
    from .preprocessing import default_preprocessing

    model = efficientnet(
        phi,
        num_classes=num_classes,
        scaling=scaling,
        alpha=alpha,
        beta=beta,
        gamma=gamma,
        drop_rate=drop_rate,
        drop_path_rate=drop_path_rate,
    )
    preprocessing = default_preprocessing(model.scaling)
    if weights is None:
        return model, preprocessing
    raise NotImplementedError("weights loading: see issue 4")
