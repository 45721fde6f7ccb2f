"""Cost model: parameter and multiply-add counts for any arch and phi at any resolution.

Models are built on the ``meta`` device, so even B7 at 600px costs no memory or compute; torch's
own FlopCounterMode does the counting (it reports 2 FLOPs per multiply-add).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["count_params", "count_macs"]


def _meta_model(model_or_phi, **kwargs) -> nn.Module:
    if isinstance(model_or_phi, nn.Module):
        return model_or_phi
    from .registry import build

    arch = kwargs.pop("arch", None) or getattr(model_or_phi, "arch", "efficientnet")
    with torch.device("meta"):
        return build(arch, model_or_phi, **kwargs)


def count_params(model_or_phi, **kwargs) -> int:
    """Number of parameters of a model, or of ``build(arch, phi, **kwargs)`` (``arch`` defaults to
    ``"efficientnet"``, or a given Scaling's arch).

    >>> count_params("b0")
    5288548
    >>> count_params(0, arch="resnet50")
    25557032
    """
    return sum(p.numel() for p in _meta_model(model_or_phi, **kwargs).parameters())


def count_macs(model_or_phi, resolution: int | None = None, **kwargs) -> int:
    """Multiply-adds of one forward pass at ``resolution`` (default: the model's own resolution).

    >>> round(count_macs("b0") / 1e9, 3)
    0.386
    """
    model = _meta_model(model_or_phi, **kwargs)
    if resolution is None:
        resolution = model.scaling.resolution
    in_chans = next(m for m in model.modules() if isinstance(m, nn.Conv2d)).in_channels
    param = next(model.parameters())
    x = torch.empty(1, in_chans, resolution, resolution, device="meta", dtype=param.dtype)
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model.to("meta")(x) if param.device.type == "meta" else _run_on_meta(model, x)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2


def _run_on_meta(model: nn.Module, x: torch.Tensor) -> None:
    import copy

    copy.deepcopy(model).to("meta")(x)
