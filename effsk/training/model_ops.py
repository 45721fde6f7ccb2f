"""What the training loop does to a model besides optimiser steps: freezing, evaluation, precise
BatchNorm statistics (recomputed, or averaged on the fly), backbone features and the head alone for
head-only training, top-k accuracy, device placement, the EMA's warm-up ramp."""

from __future__ import annotations

import itertools
import math
from typing import Callable, Iterable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from tqdm.auto import tqdm

from ..utils.runtime import autocast, explain_oom
from .config import check_freeze

__all__ = [
    "apply_freeze",
    "top_k_accuracy",
    "to_device",
    "evaluate",
    "BackboneFeatures",
    "PooledHead",
    "deepest_positions",
    "trained_batchnorms",
    "BatchNormAverage",
    "recalibrate_bn",
    "ema_warmup_avg_fn",
]


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


class BackboneFeatures:
    """Pooled backbone features of image batches, as a frozen backbone computes them: the model in
    eval mode, no autograd. ``model`` has timm's ``forward_features`` / ``forward_head``.

    Training the head alone on these (see :class:`PooledHead`) gives the gradients that training the
    whole network with the backbone frozen gives, without running the backbone under autograd, and
    without running it again every epoch when the inputs do not change (no augmentation).
    """

    def __init__(self, model: nn.Module, *, device, amp_dtype: torch.dtype | None = None, channels_last: bool = False):
        self.model, self.device, self.amp_dtype, self.channels_last = model, torch.device(device), amp_dtype, channels_last

    @torch.no_grad()  # not inference_mode: the head trains on these features under autograd
    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W)`` images -> float32 ``(N, num_features)`` features on the device."""
        was_training = self.model.training
        self.model.eval()
        with explain_oom(inputs, "computing backbone features of"), autocast(self.device, self.amp_dtype):
            feature_map = self.model.forward_features(to_device(inputs, self.device, self.channels_last))
            pooled = self.model.forward_head(feature_map, pre_logits=True)
        self.model.train(was_training)
        return pooled.float()

    def of_loader(self, loader: Iterable) -> tuple[torch.Tensor, torch.Tensor]:
        """``(features, targets)`` of every ``(inputs, targets)`` batch of ``loader``, concatenated on the CPU."""
        features, targets = [], []
        for inputs, target in loader:
            features.append(self(inputs).cpu())
            targets.append(target)
        return torch.cat(features), torch.cat(targets)


class PooledHead(nn.Module):
    """``model``'s head alone: pooled features ``(N, num_features)`` (:class:`BackboneFeatures`) ->
    outputs, through the model's ``forward_head`` (pooling a 1x1 map changes nothing)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(pooled[:, :, None, None])


def trained_batchnorms(model: nn.Module, frozen: Iterable[str] = ()) -> list[_BatchNorm]:
    """The BatchNorm layers of ``model`` whose statistics train: all but those inside the ``frozen``
    submodules (names)."""
    held_ids = {id(m) for name in frozen for m in model.get_submodule(name).modules()}
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and id(m) not in held_ids]


class BatchNormAverage:
    """Make BatchNorm running statistics the exact average of the batches that follow (precise BN
    gathered on the fly): momentum ``None`` (a cumulative average), optionally restarted, until
    :meth:`stop` restores the layers' momenta.

    Training forward passes compute each batch's statistics anyway, so averaging them over an
    epoch's last batches costs nothing, where :func:`recalibrate_bn` spends extra forward passes.

    >>> bn = nn.BatchNorm1d(2, momentum=0.1)
    >>> average = BatchNormAverage([bn])
    >>> average.start(restart=True)
    >>> _ = bn(torch.tensor([[0.0, 1.0], [2.0, 3.0]])), bn(torch.tensor([[4.0, 5.0], [6.0, 7.0]]))
    >>> average.stop()
    >>> bn.running_mean.tolist(), bn.momentum
    ([3.0, 4.0], 0.1)
    """

    def __init__(self, layers: Iterable[_BatchNorm]):
        self.layers = list(layers)
        self._momenta: dict | None = None

    def start(self, restart: bool) -> None:
        """Average from here on; ``restart=False`` continues the average the statistics hold (a resumed run)."""
        if self._momenta is None:
            self._momenta = {m: m.momentum for m in self.layers}
        for m in self.layers:
            if restart:
                m.reset_running_stats()
            m.momentum = None

    def stop(self) -> None:
        if self._momenta is not None:
            for m, momentum in self._momenta.items():
                m.momentum = momentum
            self._momenta = None


def deepest_positions(model: nn.Module, height: int, width: int) -> int:
    """Positions per channel of ``model``'s deepest feature map for ``height`` x ``width`` inputs
    (from ``feature_info`` reductions; 32, EfficientNet's, when the model does not say).

    >>> from effsk.nn import efficientnet
    >>> deepest_positions(efficientnet("b0"), 64, 64), deepest_positions(nn.Linear(2, 2), 224, 224)
    (4, 49)
    """
    reduction = max((f["reduction"] for f in getattr(model, "feature_info", ())), default=32)
    return math.ceil(height / reduction) * math.ceil(width / reduction)


def _joined(loader: Iterable, batches: int, min_images: int):
    """The inputs of the first ``batches`` batches of ``loader``, consecutive batches concatenated
    into as many groups of at least ``min_images`` images as they make (one when they are fewer)."""
    batches = min(batches, len(loader)) if hasattr(loader, "__len__") else batches
    batch_size = getattr(loader, "batch_size", None) or 1
    groups = max(1, min(batches, batches * batch_size // max(1, min_images)))
    items = iter(loader)
    for g in range(groups):
        chunk = list(itertools.islice(items, batches // groups + (g < batches % groups)))
        if chunk:
            yield torch.cat([b[0] if isinstance(b, (tuple, list)) else b for b in chunk])


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
    min_images: int = 1,
) -> None:
    """Recompute BatchNorm running statistics as exact averages over ``batches`` batches of
    ``loader`` (as :func:`torch.optim.swa_utils.update_bn` does), with the model in train mode except
    the ``frozen`` submodules (names), which stay in eval mode and keep their statistics.

    Consecutive batches are joined into forward passes of at least ``min_images`` images (the same
    images): see :data:`effsk.training.config.PRECISE_BN_VALUES` for why small feature maps need it."""
    device = torch.device(device)
    frozen = list(frozen)
    layers = trained_batchnorms(model, frozen)
    if not layers or batches <= 0:
        return
    was_training = model.training
    average = BatchNormAverage(layers)
    average.start(restart=True)
    model.train()
    for name in frozen:
        model.get_submodule(name).eval()
    for inputs in _joined(loader, batches, min_images):
        with autocast(device, amp_dtype):
            model(to_device(inputs, device, channels_last))
    average.stop()
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
