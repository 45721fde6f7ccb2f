"""Cost model: parameter and multiply-add counts for any arch and phi at any resolution.

Models are built on the ``meta`` device, so even B7 at 600px costs no memory or compute; torch's
own FlopCounterMode does the counting (it reports 2 FLOPs per multiply-add). A config is built once
per process and each (config, resolution) counted once: tables that ask for both counts of many
variants pay for each model once. The cache is keyed by the resolved config, so ``"b7"``, ``7`` and
``resolve("b7")`` share one model, and the default resolution by its value.
"""

from __future__ import annotations

import copy
from functools import lru_cache

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..scaling import Scaling, resolve
from .registry import build

__all__ = ["count_params", "count_macs"]


# build() options that only say how phi resolves: they become part of the resolved config.
_RESOLVE_OPTIONS = ("arch", "scaling", "alpha", "beta", "gamma")


def _config_key(phi, kwargs: dict) -> tuple[Scaling, tuple]:
    """The resolved config of ``build(arch, phi, **kwargs)`` and its remaining build options."""
    options = dict(kwargs)
    how = {name: options.pop(name) for name in _RESOLVE_OPTIONS if name in options}
    return resolve(phi, **how), tuple(sorted(options.items()))


@lru_cache(maxsize=32)
def _cached_meta_model(config: Scaling, options: tuple) -> nn.Module:
    with torch.device("meta"):
        return build(config.arch, config, **dict(options))


def _meta_model(model_or_phi, kwargs: dict) -> nn.Module:
    if isinstance(model_or_phi, nn.Module):
        return model_or_phi
    return _cached_meta_model(*_config_key(model_or_phi, kwargs))


def count_params(model_or_phi, **kwargs) -> int:
    """Number of parameters of a model, or of ``build(arch, phi, **kwargs)`` (``arch`` defaults to
    ``"efficientnet"``, or a given Scaling's arch).

    >>> count_params("b0")
    5288548
    >>> count_params(0, arch="resnet50")
    25557032
    """
    return sum(p.numel() for p in _meta_model(model_or_phi, kwargs).parameters())


def count_macs(model_or_phi, resolution: int | None = None, **kwargs) -> int:
    """Multiply-adds of one forward pass at ``resolution`` (default: the model's own resolution).

    >>> round(count_macs("b0") / 1e9, 3)
    0.386
    """
    if isinstance(model_or_phi, nn.Module):
        return _count_macs(model_or_phi, resolution)
    config, options = _config_key(model_or_phi, kwargs)
    return _cached_macs(config, resolution or config.resolution, options)


@lru_cache(maxsize=128)
def _cached_macs(config: Scaling, resolution: int, options: tuple) -> int:
    return _count_macs(_cached_meta_model(config, options), resolution)


def _count_macs(model: nn.Module, resolution: int | None) -> int:
    if resolution is None:
        resolution = model.scaling.resolution
    in_chans = next(m for m in model.modules() if isinstance(m, nn.Conv2d)).in_channels
    param = next(model.parameters())
    x = torch.empty(1, in_chans, resolution, resolution, device="meta", dtype=param.dtype)
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            # a real model is counted on a meta copy: counting never moves or runs it
            (model if param.device.type == "meta" else copy.deepcopy(model).to("meta"))(x)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2
