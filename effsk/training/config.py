"""The settings of one training run (:class:`TrainConfig`) and the constants they draw on."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .optim import OPTIMIZERS, SCHEDULES

__all__ = [
    "TrainConfig",
    "FREEZE_MODES",
    "MONITORS",
    "PRECISE_BN_BATCHES",
    "PRECISE_BN_VALUES",
    "AVERAGED_BN_VALUES",
    "AVERAGED_BN_IMAGES",
    "check_freeze",
]

FREEZE_MODES = ("none", "backbone", "bn")
MONITORS = ("val_loss", "val_score")
# Training batches at the end of each epoch whose BatchNorm statistics are averaged for validation in
# short runs (fine-tuning, the coefficient search): there the running averages lag the fast-moving
# weights and spoil eval-mode predictions (see TrainConfig.precise_bn_batches).
PRECISE_BN_BATCHES = 64
# Precise BN sees each BatchNorm layer's input through the layers above it normalised by the current
# batch. Where the deepest feature map holds few positions per image (1x1 at 32 px), a batch of a dozen
# images normalises them unlike the population statistics prediction uses, so the statistics gathered
# are not the eval-mode network's (held-out R^2 of a 32 px regressor, batch 16, three seeds: 0.77-0.87
# with batches joined to 256 positions, 0.69-0.74 averaging the training batches, 0.52-0.75 from the
# batches as they are). Recomputing joins training batches until the deepest map holds this many
# positions per channel...
PRECISE_BN_VALUES = 256
# ...and training batches holding at least this many are averaged as they pass instead, at no cost:
# at 128 (64 px, batch 32) that matched joined recomputing (regressor R^2 0.93/0.91 both; Lite0
# transfer at 64 px: digits 0.811 vs 0.814, lfw 0.98 vs 0.95, photos 0.864 vs 0.871).
AVERAGED_BN_VALUES = 128
# Averaged as they pass, the statistics lag the weights, which move while the batches pass: only the
# epoch's last batches holding this many images are averaged (Lite0 transfer, digits at 64 px, three
# seeds: 0.770 averaging a whole epoch of 23 batches, 0.787 the last 8 (256 images), as recomputing).
AVERAGED_BN_IMAGES = 256


@dataclass
class TrainConfig:
    """Everything that shapes one training run.

    Parameters
    ----------
    max_epochs : int
        Epochs to run (a resumed run continues up to the same number).
    optimizer : {"adamw", "sgd", "rmsprop"}
        ``"rmsprop"`` is TF-style (:class:`effsk.training.optim.RMSpropTF`), the paper's optimiser.
    lr, weight_decay, momentum, betas, rmsprop_decay, eps
        Optimiser settings; weight decay skips biases and norm parameters. ``eps=None`` uses 1e-8 for
        AdamW and the TF value 1e-3 for RMSProp.
    backbone_lr_scale, layer_decay : float
        Learning rate of everything but the head (``model.get_classifier()``) relative to ``lr``, and
        its decay per block down a ``features`` sequence towards the stem (block ``i`` of ``n``:
        ``lr * backbone_lr_scale * layer_decay ** (n - 1 - i)``; see
        :func:`effsk.training.optim.layerwise_lr_scale`). Fine-tuning a pretrained network moves
        the lower layers less. Warm-up and schedule scale every group alike.
    schedule : {"cosine", "step", "constant"}
        Per-step learning-rate schedule after ``warmup_epochs`` of linear warm-up. ``"cosine"`` decays
        to ``min_lr`` at ``max_epochs``; ``"step"`` multiplies by ``decay_rate`` every
        ``decay_epochs`` (paper: 0.97 every 2.4 epochs).
    label_smoothing : float
        Used by the default loss (cross-entropy) when no ``loss_fn`` is given.
    clip_grad_norm : float or None
        Clip the global gradient norm of the trainable parameters.
    ema_decay : float or None
        Keep an exponential moving average of the weights (and BatchNorm statistics); validation uses
        it and the model ends with its weights.
    ema_warmup : bool
        Ramp the EMA decay as TF's ``ExponentialMovingAverage(num_updates=step)`` does (the paper's
        recipe): ``min(ema_decay, (1 + n) / (10 + n))`` at the n-th update, so that a decay such as
        0.9999 does not pin the average to the initial weights for the first ~10k steps.
    precise_bn_batches : int
        "Precise BN" (Wu & Johnson 2021): the BatchNorm statistics that train become exact averages
        over this many training batches, for validation and the final model. Running averages lag
        behind fast-moving weights, which on short runs makes eval-mode predictions useless; 0 turns
        this off. When each training batch holds :data:`AVERAGED_BN_VALUES` positions per channel at
        the deepest feature map, the statistics average the epoch's last this-many batches as their
        own forward passes compute them, at no extra cost (at most the last batches holding
        :data:`AVERAGED_BN_IMAGES` images: the weights move meanwhile). Otherwise (small batches or feature maps),
        or with ``ema_decay`` (whose average would take in the restarted statistics), they are
        recomputed before each validation (and at the end when there is none) by extra forward passes
        over this many training batches, joined to :data:`PRECISE_BN_VALUES` positions.
    freeze : {"none", "backbone", "bn"} or int
        See :func:`apply_freeze`.
    early_stopping, patience, monitor, min_delta
        Stop after ``patience`` epochs without improvement of ``monitor`` (``"val_loss"``, lower is
        better, or ``"val_score"``, higher is better) and restore the best weights.
    device, precision : str
        As :func:`effsk.utils.runtime.resolve_device` / :func:`~effsk.utils.runtime.resolve_precision`.
    channels_last : bool or None
        ``None``: the channels_last memory format where it trains faster
        (:func:`effsk.utils.runtime.prefers_channels_last`: CUDA and x86 CPUs).
    seed : int or None
        Reseeds the train loader's generator every epoch (``seed + epoch``) so shuffling, and worker
        augmentation seeds, depend only on the epoch: a resumed run sees the same batches.
    steps_per_epoch : int or None
        Batches per epoch, for loaders without ``len``.
    verbose : int
        ``>= 1``: a progress bar per epoch and a summary line per epoch.
    epoch_offset, total_epochs, phase
        Progress display only, for a run that is one phase of a longer one (the estimators train the
        head, then the network, each phase its own run): epoch lines read ``epoch {epoch_offset +
        e}/{total_epochs} ({phase})``. ``total_epochs=None`` means ``epoch_offset + max_epochs``.
    """

    max_epochs: int = 10
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.01
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.999)
    rmsprop_decay: float = 0.9
    eps: float | None = None
    backbone_lr_scale: float = 1.0
    layer_decay: float = 1.0
    schedule: str = "cosine"
    warmup_epochs: float = 0.0
    min_lr: float = 0.0
    decay_epochs: float = 2.4
    decay_rate: float = 0.97
    label_smoothing: float = 0.0
    clip_grad_norm: float | None = None
    ema_decay: float | None = None
    ema_warmup: bool = False
    precise_bn_batches: int = 0
    freeze: str | int = "none"
    early_stopping: bool = False
    patience: int = 5
    monitor: str = "val_loss"
    min_delta: float = 0.0
    device: str | torch.device = "auto"
    precision: str = "auto"
    channels_last: bool | None = None
    seed: int | None = None
    steps_per_epoch: int | None = None
    verbose: int = 0
    epoch_offset: int = 0
    total_epochs: int | None = None
    phase: str = ""

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer={self.optimizer!r}; use one of {OPTIMIZERS}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule={self.schedule!r}; use one of {SCHEDULES}")
        if self.monitor not in MONITORS:
            raise ValueError(f"monitor={self.monitor!r}; use one of {MONITORS}")
        if not (self.backbone_lr_scale >= 0 and 0 < self.layer_decay <= 1):
            raise ValueError(
                f"need backbone_lr_scale >= 0 and 0 < layer_decay <= 1, got {self.backbone_lr_scale}, {self.layer_decay}"
            )
        if self.precise_bn_batches < 0:
            raise ValueError(f"precise_bn_batches={self.precise_bn_batches} must be >= 0")
        if self.max_epochs < 0 or self.patience < 1:
            raise ValueError(f"need max_epochs >= 0 and patience >= 1, got {self.max_epochs}, {self.patience}")
        if self.ema_decay is not None and not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay={self.ema_decay!r} must lie in [0, 1)")
        if self.epoch_offset < 0:
            raise ValueError(f"epoch_offset={self.epoch_offset} must be >= 0")
        check_freeze(self.freeze)

    def epoch_label(self, epoch: int) -> str:
        """How progress output names the run's ``epoch`` (0-based): ``"epoch 2/3 (train)"``.

        >>> TrainConfig(max_epochs=2, epoch_offset=1, phase="train").epoch_label(0)
        'epoch 2/3 (train)'
        """
        total = self.epoch_offset + self.max_epochs if self.total_epochs is None else self.total_epochs
        label = f"epoch {self.epoch_offset + epoch + 1}/{total}"
        return f"{label} ({self.phase})" if self.phase else label

    def to_dict(self) -> dict:
        d = asdict(self)
        d["device"] = str(d["device"])
        return d


def check_freeze(freeze) -> None:
    """Raise ``ValueError`` unless ``freeze`` is a mode of :func:`effsk.training.apply_freeze`."""
    if isinstance(freeze, bool) or not (freeze in FREEZE_MODES or (isinstance(freeze, int) and freeze >= 0)):
        raise ValueError(f"freeze={freeze!r}; use one of {FREEZE_MODES} or an int k >= 0 (stem and first k stages)")
