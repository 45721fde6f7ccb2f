"""What the training loop does to a model besides optimiser steps: freezing, evaluation, precise
BatchNorm statistics, top-k accuracy, device placement, the EMA's warm-up ramp."""

from __future__ import annotations

import itertools
from typing import Callable, Iterable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from tqdm.auto import tqdm

from ..utils.runtime import autocast, explain_oom
from .config import check_freeze

__all__ = ["apply_freeze", "top_k_accuracy", "to_device", "evaluate", "recalibrate_bn", "ema_warmup_avg_fn"]


def apply_freeze(model: nn.Module, freeze: str | int) -> list[nn.Module]:
    """Set which parameters train; return the modules that must stay in eval mode while training.

    ``"none"``: everything trains. ``"backbone"``: only the head (``model.get_classifier()``) trains; the rest runs in
    eval mode (BatchNorm statistics frozen, no stochastic depth). int k: the stem and the first k
    stages (``features[0..k]``) are frozen the same way. ``"bn"``: every weight trains but all
    BatchNorm layers run in eval mode, so their running statistics stay as loaded.

    >>> from effsk.nn import efficientnet
    >>> model = efficientnet("b0", num_classes=3)
    >>> held = apply_freeze(model, 2)
    >>> len(held), sum(p.numel() for p in model.features[:3].parameters() if p.requires_grad)
    (3, 0)
    """
    check_freeze(freeze)
    for p in model.parameters():
        p.requires_grad_(True)
    if freeze == "none":
        return []
    if freeze == "bn":
        return [m for m in model.modules() if isinstance(m, _BatchNorm)]
    if freeze == "backbone":
        head = model.get_classifier() if hasattr(model, "get_classifier") else getattr(model, "classifier", None)
        if head is None:
            raise ValueError("freeze='backbone' needs a model with a head (`get_classifier()` or `classifier`)")
        frozen = [m for m in model.children() if not any(sub is head for sub in m.modules())]
    else:
        features = getattr(model, "features", None)
        if features is None or freeze > len(features) - 2:
            top = "?" if features is None else len(features) - 2
            raise ValueError(f"freeze={freeze} is out of range: this model has {top} stages after its stem")
        frozen = list(features[: freeze + 1])
    for module in frozen:
        for p in module.parameters():
            p.requires_grad_(False)
    return frozen


def top_k_accuracy(outputs: torch.Tensor, targets: torch.Tensor, k: int = 1) -> float:
    """Fraction of rows whose target is among the ``k`` largest outputs."""
    top = outputs.topk(min(k, outputs.shape[1]), dim=1).indices
    return (top == targets.view(-1, 1)).any(dim=1).float().mean().item()


def to_device(x, device: torch.device, channels_last: bool = False):
    if not isinstance(x, torch.Tensor):
        return x
    if channels_last and x.ndim == 4:
        return x.to(device, non_blocking=True, memory_format=torch.channels_last)
    return x.to(device, non_blocking=True)


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    *,
    device: torch.device | str = "cpu",
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
    progress: bool = False,
):
    """Run ``model`` in eval mode over ``(inputs, targets)`` batches.

    Returns ``(outputs, targets)``: outputs as float32 on the CPU, in loader order, and the batches'
    targets concatenated (``None`` if the loader yields inputs only).
    """
    device = torch.device(device)
    model.eval()
    outputs, targets = [], []
    for batch in tqdm(loader, desc="evaluate", leave=False, disable=not progress):
        inputs, target = (batch[0], batch[1]) if isinstance(batch, (tuple, list)) else (batch, None)
        with explain_oom(inputs, "evaluating"):
            with autocast(device, amp_dtype):
                out = model(to_device(inputs, device, channels_last))
        outputs.append(out.float().cpu())
        if target is not None:
            targets.append(target)
    out = torch.cat(outputs) if outputs else torch.empty(0)
    tgt = torch.cat(targets) if targets else None
    if gather is not None:
        out = gather(out)
        tgt = gather(tgt) if tgt is not None else None
    return out, tgt


@torch.no_grad()
def recalibrate_bn(
    model: nn.Module,
    loader: Iterable,
    *,
    batches: int,
    device: torch.device | str = "cpu",
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    frozen: Iterable[str] = (),
) -> None:
    """Recompute BatchNorm running statistics as exact averages over ``batches`` batches of
    ``loader`` (as :func:`torch.optim.swa_utils.update_bn` does), with the model in train mode except
    the ``frozen`` submodules (names), which stay in eval mode and keep their statistics."""
    device = torch.device(device)
    held = [model.get_submodule(name) for name in frozen]
    held_ids = {id(m) for top in held for m in top.modules()}
    layers = [m for m in model.modules() if isinstance(m, _BatchNorm) and id(m) not in held_ids]
    if not layers or batches <= 0:
        return
    was_training = model.training
    momenta = {}
    for m in layers:
        m.reset_running_stats()
        momenta[m] = m.momentum
        m.momentum = None  # cumulative average
    model.train()
    for m in held:
        m.eval()
    for batch in itertools.islice(loader, batches):
        inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
        with autocast(device, amp_dtype):
            model(to_device(inputs, device, channels_last))
    for m, momentum in momenta.items():
        m.momentum = momentum
    model.train(was_training)


def ema_warmup_avg_fn(decay: float):
    """EMA update with TF's decay ramp ``min(decay, (1 + n) / (10 + n))``, for AveragedModel.

    The ramp is computed from AveragedModel's update count on its device: no host sync per step.
    """

    @torch.no_grad()
    def update(ema_params, params, num_averaged) -> None:
        ramped = ((1 + num_averaged) / (10 + num_averaged)).clamp(max=decay)
        if torch.is_floating_point(ema_params[0]) or torch.is_complex(ema_params[0]):
            torch._foreach_mul_(ema_params, ramped)
            torch._foreach_add_(ema_params, torch._foreach_mul(params, 1 - ramped))
        else:
            for p_ema, p in zip(ema_params, params):
                p_ema.copy_(p_ema * ramped + p * (1 - ramped))

    return update
