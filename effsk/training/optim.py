"""What moves the weights: optimisers and learning-rate schedules for :mod:`effsk.training`.

AdamW and SGD are torch's own. RMSProp follows the TF reference (the EfficientNet paper's optimiser):
epsilon inside the square root, the mean-square accumulator starting at one and the learning rate
applied inside the momentum buffer. torch's ``RMSprop`` adds epsilon *outside* the root, which with
the paper's eps=1e-3 makes steps up to ~30x larger for parameters with tiny gradients.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["OPTIMIZERS", "SCHEDULES", "RMSpropTF", "parameter_groups", "build_optimizer", "LRSchedule", "build_scheduler"]

OPTIMIZERS = ("adamw", "sgd", "rmsprop")
SCHEDULES = ("cosine", "step", "constant")
_DEFAULT_EPS = {"adamw": 1e-8, "rmsprop": 1e-3}


class RMSpropTF(torch.optim.Optimizer):
    """RMSProp as TensorFlow computes it (``tf.compat.v1.train.RMSPropOptimizer``).

    ``ms = decay * ms + (1 - decay) * g**2`` (``ms`` starts at 1),
    ``mom = momentum * mom + lr * g / sqrt(ms + eps)``, ``p -= mom``.
    ``weight_decay`` is L2 added to the gradient, as the TF reference adds it to the loss.
    """

    def __init__(self, params, lr=0.016, decay=0.9, momentum=0.9, eps=1e-3, weight_decay=0.0):
        if lr < 0 or eps <= 0 or not 0 <= decay < 1 or momentum < 0 or weight_decay < 0:
            raise ValueError(f"invalid RMSpropTF settings: lr={lr}, decay={decay}, momentum={momentum}, eps={eps}, weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, decay=decay, momentum=momentum, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if group["weight_decay"]:
                    grad = grad.add(p, alpha=group["weight_decay"])
                state = self.state[p]
                if not state:
                    state["square_avg"] = torch.ones_like(p)
                    state["momentum_buffer"] = torch.zeros_like(p)
                square_avg = state["square_avg"]
                square_avg.mul_(group["decay"]).addcmul_(grad, grad, value=1 - group["decay"])
                update = grad / (square_avg + group["eps"]).sqrt_()
                buf = state["momentum_buffer"]
                buf.mul_(group["momentum"]).add_(update, alpha=group["lr"])
                p.sub_(buf)
        return loss


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters in two groups: weight decay on weights, none on biases and norm
    parameters (every 1-D tensor), as the TF reference excludes batch norm from its L2 term."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(
    model: nn.Module,
    name: str = "adamw",
    *,
    lr: float = 1e-3,
    weight_decay: float = 0.01,
    momentum: float = 0.9,
    betas: tuple[float, float] = (0.9, 0.999),
    rmsprop_decay: float = 0.9,
    eps: float | None = None,
) -> torch.optim.Optimizer:
    """An optimiser over ``model``'s trainable parameters.

    ``eps=None`` takes the optimiser's customary value: 1e-8 for AdamW, 1e-3 (TF) for RMSProp.

    >>> opt = build_optimizer(nn.Linear(3, 2), "rmsprop", lr=0.016)
    >>> type(opt).__name__, opt.defaults["eps"]
    ('RMSpropTF', 0.001)
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer={name!r}; use one of {OPTIMIZERS}")
    groups = parameter_groups(model, weight_decay)
    if not groups:
        raise ValueError("the model has no trainable parameters (everything is frozen)")
    eps = _DEFAULT_EPS.get(name) if eps is None else eps
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=momentum > 0)
    return RMSpropTF(groups, lr=lr, decay=rmsprop_decay, momentum=momentum, eps=eps)


@dataclass
class LRSchedule:
    """Multiplier of the base learning rate at optimiser step ``step`` (0-based).

    Linear warm-up over ``warmup_steps`` (reaching 1 at the last warm-up step), then
    ``"cosine"``: half a cosine from 1 to ``min_factor`` at ``total_steps``;
    ``"step"``: ``decay_rate ** floor(step / decay_steps)``, counted from step 0 as the TF reference
    counts it (the paper's x0.97 every 2.4 epochs); ``"constant"``: 1.
    """

    kind: str
    total_steps: int
    warmup_steps: int = 0
    min_factor: float = 0.0
    decay_steps: float = 1.0
    decay_rate: float = 1.0

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.kind == "cosine":
            span = max(1, self.total_steps - self.warmup_steps)
            t = min(1.0, (step - self.warmup_steps) / span)
            return self.min_factor + (1 - self.min_factor) * 0.5 * (1 + math.cos(math.pi * t))
        if self.kind == "step":
            return self.decay_rate ** math.floor(step / self.decay_steps)
        return 1.0


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    kind: str,
    *,
    steps_per_epoch: int,
    epochs: int,
    warmup_epochs: float = 0.0,
    min_lr: float = 0.0,
    decay_epochs: float = 2.4,
    decay_rate: float = 0.97,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step :class:`~torch.optim.lr_scheduler.LambdaLR` following :class:`LRSchedule`.

    >>> opt = torch.optim.SGD(nn.Linear(2, 1).parameters(), lr=0.1)
    >>> sched = build_scheduler(opt, "step", steps_per_epoch=10, epochs=5, decay_epochs=2.4, decay_rate=0.97)
    >>> for _ in range(24):
    ...     opt.step(); sched.step()
    >>> round(opt.param_groups[0]["lr"], 6)
    0.097
    """
    if kind not in SCHEDULES:
        raise ValueError(f"schedule={kind!r}; use one of {SCHEDULES}")
    base_lr = optimizer.defaults["lr"]
    schedule = LRSchedule(
        kind=kind,
        total_steps=max(1, steps_per_epoch * epochs),
        warmup_steps=int(round(warmup_epochs * steps_per_epoch)),
        min_factor=min_lr / base_lr if base_lr > 0 else 0.0,
        decay_steps=max(decay_epochs * steps_per_epoch, 1e-12),
        decay_rate=decay_rate,
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
