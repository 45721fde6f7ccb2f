"""What moves the weights: optimisers and learning-rate schedules for :mod:`effsk.training`.

AdamW and SGD are torch's own. RMSProp follows the TF reference (the EfficientNet paper's optimiser):
epsilon inside the square root, the mean-square accumulator starting at one and the learning rate
applied inside the momentum buffer. torch's ``RMSprop`` adds epsilon *outside* the root, which with
the paper's eps=1e-3 makes steps up to ~30x larger for parameters with tiny gradients.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

__all__ = ["OPTIMIZERS", "SCHEDULES", "RMSpropTF", "parameter_groups", "layerwise_lr_scale", "build_optimizer", "LRSchedule", "build_scheduler"]

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


def parameter_groups(model: nn.Module, weight_decay: float, lr_scale: Callable[[str], float] | None = None) -> list[dict]:
    """Trainable parameters grouped by weight decay and learning-rate scale.

    Weight decay applies to weights, not to biases and norm parameters (every 1-D tensor), as the TF
    reference excludes batch norm from its L2 term. ``lr_scale(name)`` (default: 1 for all) gives the
    factor on the learning rate of the parameter called ``name``; it is stored in each group as
    ``"lr_scale"``. Groups come in order of decreasing scale, decayed before not decayed.

    >>> [(len(g["params"]), g["weight_decay"], g["lr_scale"]) for g in parameter_groups(nn.Linear(3, 2), 0.1)]
    [(1, 0.1, 1.0), (1, 0.0, 1.0)]
    """
    groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            scale = 1.0 if lr_scale is None else float(lr_scale(name))
            groups.setdefault((scale, p.ndim > 1), []).append(p)
    return [
        {"params": params, "weight_decay": weight_decay if decayed else 0.0, "lr_scale": scale}
        for (scale, decayed), params in sorted(groups.items(), key=lambda item: (-item[0][0], not item[0][1]))
    ]


def layerwise_lr_scale(model: nn.Module, backbone_scale: float = 1.0, layer_decay: float = 1.0) -> Callable[[str], float]:
    """``lr_scale`` for :func:`parameter_groups`: 1 for the head, less for the layers below it.

    The head is ``model.get_classifier()`` (or ``model.classifier``). With a ``features`` sequence
    (stem, stages, final convolution: torchvision's and effsk's EfficientNet layout), block ``i`` of
    ``n`` gets ``backbone_scale * layer_decay ** (n - 1 - i)``: the top block ``backbone_scale``, the stem
    the least (layer-wise learning-rate decay, as BEiT and timm's ``layer_decay``). Every other
    parameter gets ``backbone_scale``.

    >>> from torchvision.models import efficientnet_b0
    >>> scale = layerwise_lr_scale(efficientnet_b0(), backbone_scale=0.1, layer_decay=0.5)
    >>> scale("classifier.1.weight"), scale("features.8.0.weight"), scale("features.6.0.block.0.0.weight")
    (1.0, 0.1, 0.025)
    """
    get_head = getattr(model, "get_classifier", None)
    head = get_head() if get_head is not None else getattr(model, "classifier", None)
    head_params = {id(p) for p in head.parameters()} if head is not None else set()
    named = dict(model.named_parameters())
    features = getattr(model, "features", None)
    depth = {}
    if isinstance(features, nn.Sequential):
        for i, block in enumerate(features):
            depth.update({id(p): len(features) - 1 - i for p in block.parameters()})

    def scale(name: str) -> float:
        p = named[name]
        if id(p) in head_params:
            return 1.0
        return backbone_scale * layer_decay ** depth.get(id(p), 0)

    return scale


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
    lr_scale: Callable[[str], float] | None = None,
) -> torch.optim.Optimizer:
    """An optimiser over ``model``'s trainable parameters.

    ``eps=None`` takes the optimiser's customary value: 1e-8 for AdamW, 1e-3 (TF) for RMSProp.
    ``lr_scale`` (see :func:`parameter_groups`, :func:`layerwise_lr_scale`): each group's learning
    rate is ``lr * lr_scale(name)``; schedules then scale every group's rate by the same factor.

    >>> opt = build_optimizer(nn.Linear(3, 2), "rmsprop", lr=0.016)
    >>> type(opt).__name__, opt.defaults["eps"]
    ('RMSpropTF', 0.001)
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer={name!r}; use one of {OPTIMIZERS}")
    groups = parameter_groups(model, weight_decay, lr_scale)
    if not groups:
        raise ValueError("the model has no trainable parameters (everything is frozen)")
    for group in groups:
        group["lr"] = lr * group["lr_scale"]
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
