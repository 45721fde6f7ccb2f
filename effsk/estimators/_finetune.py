"""Fine-tuning estimators' shared machinery: data split, loaders, phases, shared documentation.

:class:`EfficientNetClassifier` and :class:`EfficientNetRegressor` differ only in how targets become
network outputs and losses; everything else (model building, freezing schedule, the training loop,
reproducibility) lives here once. Prediction and pickling are the featurizer's too
(:class:`~effsk.estimators._base.PreparedInferenceMixin`).
"""

from __future__ import annotations

from numbers import Integral, Real

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from sklearn.base import BaseEstimator, _fit_context
from sklearn.utils import _safe_indexing, check_random_state
from sklearn.utils._param_validation import Interval, StrOptions

from ..data.gpu_decode import resolve_num_workers
from ..data.images import ImageLoadError, make_loader, num_images
from ..data.transforms import AUGMENT_PRESETS, train_transform
from ..training import FREEZE_MODES, PRECISE_BN_BATCHES, TrainConfig, Trainer, holdout_split
from ..training.model_ops import BackboneFeatures
from ..training.optim import OPTIMIZERS
from ..utils.runtime import forked_rng, prefers_channels_last, resolve_device, resolve_precision
from ._base import (
    CROP_CONSTRAINTS,
    MODEL_PARAMETER_CONSTRAINTS,
    RUNTIME_PARAMETER_CONSTRAINTS,
    PreparedInferenceMixin,
    build_estimator_model,
    input_preprocessing,
)

__all__ = ["FineTuneEstimator", "FINETUNE_PARAMETER_DOCS", "BACKBONE_LR_SCALE"]

#: Learning rate of the pretrained layers relative to ``lr`` (the head's) once they join the
#: training. Measured on benchmarks/transfer.py at 3 epochs, 3 seeds: 0.1 to 1 all beat one rate for
#: all; 0.3 and 0.5 tie in accuracy, but at 0.5 and above the training loss of the 90 lfw images
#: rose within the fine-tuning phase (at 1 already at the boundary). Layer-wise decay below the top
#: block (0.7 or 0.8 per block) did not help.
BACKBONE_LR_SCALE = 0.3



class IndexedLoss:
    """Loss over a batch of item positions: looks up targets and sample weights, averages the
    per-sample loss weighted as ``sum(w * loss) / sum(w)`` (torch's and scikit-learn's convention,
    so weight 2 counts an item twice)."""

    def __init__(self, per_sample, targets: torch.Tensor, weights: torch.Tensor):
        self.per_sample = per_sample
        self._tables = {torch.device("cpu"): (targets, weights)}

    def _on(self, device: torch.device):
        if device not in self._tables:
            targets, weights = self._tables[torch.device("cpu")]
            self._tables[device] = (targets.to(device), weights.to(device))
        return self._tables[device]

    def lookup(self, index: torch.Tensor):
        return self._on(index.device)[0][index], self._on(index.device)[1][index]

    def __call__(self, outputs: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        targets, weights = self.lookup(index)
        losses = self.per_sample(outputs.float(), targets)
        return (losses * weights).sum() / weights.sum().clamp_min(torch.finfo(torch.float32).tiny)


#: numpydoc entries of the parameters and attributes the classifier and the regressor share.
FINETUNE_PARAMETER_DOCS = {
    "training_parameters": (
        "resolution", "crop", "freeze", "head_epochs", "max_epochs", "lr", "batch_size", "optimizer", "weight_decay",
        "augment", "drop_rate_drop_path_rate", "validation_fraction", "early_stopping", "patience",
    ),
    "runtime_parameters": ("device", "precision", "num_workers", "random_state", "verbose", "warm_start"),
    "fitted_attributes": ("model_", "preprocessing_", "history_", "best_epoch_"),
    "weights": """\
weights : "imagenet", None or path, default="imagenet"
    Starting weights: published ImageNet weights, random initialisation (``None``), or a file (an
    effsk checkpoint or a torchvision-format state_dict). A head of another size than the task's
    is replaced by a fresh one, initialised at zero.""",
    "resolution": """\
resolution : int, optional
    Train and predict at this crop size instead of the variant's.""",
    "freeze": """\
freeze : {"auto", "none", "backbone", "bn"} or int, default="auto"
    What stays fixed while training. ``"none"``: nothing. ``"backbone"``: only the head trains
    (BatchNorm statistics frozen too). int k: the stem and the first k stages are frozen.
    ``"bn"``: every weight trains, BatchNorm statistics stay as loaded. ``"auto"``: with
    pretrained weights, the head first trains alone for ``head_epochs``, then ``"bn"``, so the
    features the head learnt on keep their normalisation when the backbone joins; from random
    weights ``"none"``.""",
    "head_epochs": """\
head_epochs : int, default=1
    Epochs (out of ``max_epochs``) to train the head alone before unfreezing, when starting from
    pretrained weights (fastai's ``fine_tune``). Ignored with ``weights=None``,
    ``freeze="backbone"`` and warm starts. While the head trains alone, the frozen backbone's
    features are computed without autograd, and only once when ``augment="none"``.""",
    "max_epochs": """\
max_epochs : int, default=10
    Epochs in all, head epochs included.""",
    "lr": """\
lr : float, default=1e-3
    Peak learning rate of the head, and of every layer when training from random weights. Each
    phase decays it to zero along a cosine. The head phase starts at ``lr``; when pretrained
    layers join they train at 0.3 times the rate (``BACKBONE_LR_SCALE``), and every rate warms up
    linearly from zero over the phase's first epoch (half the phase if shorter). From random
    weights the warm-up is the first tenth of the training, at most one epoch.""",
    "batch_size": """\
batch_size : int, default=32
    Images per step (at least 2: BatchNorm cannot train on one) and per forward pass.""",
    "optimizer": """\
optimizer : {"adamw", "sgd", "rmsprop"}, default="adamw"
    The optimiser (see :mod:`effsk.training.optim`).""",
    "weight_decay": """\
weight_decay : float, default=0.01
    Not applied to biases and normalisation parameters.""",
    "augment": """\
augment : {"auto", "none", "light", "randaugment", "autoaugment"}, default="auto"
    Training-time augmentation (see :mod:`effsk.data.transforms`). ``"auto"``: ``"none"`` when
    fine-tuning pretrained weights, ``"light"`` from random weights. Fine-tunes of a few epochs
    on a few hundred images scored higher without augmentation (benchmarks/transfer.py, 3 and 10
    epochs); ``"light"`` (random resized crops of 50-100%, horizontal flips) suits photographs
    whose framing varies, not images that flipping changes (digits, text).""",
    "drop_rate_drop_path_rate": """\
drop_rate, drop_path_rate : float, optional
    Classifier dropout and stochastic depth (default: the variant's).""",
    "validation_fraction": """\
validation_fraction : float, default=0.1
    Share of the images held out for early stopping (stratified by class for single-label
    classification).""",
    "early_stopping": """\
early_stopping : bool, default=True
    Stop when the validation loss has not improved for ``patience`` epochs; keep the best weights.""",
    "patience": """\
patience : int, default=3
    Epochs without improvement of the validation loss before stopping.""",
    "random_state": """\
random_state : int, RandomState or None, default=None
    Seeds the initialisation, the validation split, shuffling, augmentation and dropout. Fits
    with the same int on CPU give identical predictions.""",
    "warm_start": """\
warm_start : bool, default=False
    Continue from the fitted weights (same targets) instead of starting over.""",
    "history_": """\
history_ : list of dict
    One record per epoch: ``epoch``, ``phase`` (``"head"``/``"train"``), ``train_loss``,
    ``val_loss``, ``val_score`` (accuracy, or R^2 for the regressor), ``lr`` (the head's, at the
    epoch's last step), ``seconds``, ``images_per_second``.""",
    "best_epoch_": """\
best_epoch_ : int
    Index in ``history_`` of the epoch whose weights the model holds.""",
}


class FineTuneEstimator(PreparedInferenceMixin, BaseEstimator):
    """Shared base of the fine-tuning estimators (not public). Subclasses define the target
    handling: ``_prepare_targets``, ``_per_sample_loss``, ``_validation_score``."""

    _parameter_constraints: dict = {
        **MODEL_PARAMETER_CONSTRAINTS,
        **RUNTIME_PARAMETER_CONSTRAINTS,
        "batch_size": [Interval(Integral, 2, None, closed="left")],  # BatchNorm cannot train on a batch of one
        "resolution": [Interval(Integral, 8, None, closed="left"), None],
        **CROP_CONSTRAINTS,
        "freeze": [StrOptions({"auto", *FREEZE_MODES}), Interval(Integral, 0, None, closed="left")],
        "head_epochs": [Interval(Integral, 0, None, closed="left")],
        "max_epochs": [Interval(Integral, 1, None, closed="left")],
        "lr": [Interval(Real, 0, None, closed="neither")],
        "optimizer": [StrOptions(set(OPTIMIZERS))],
        "weight_decay": [Interval(Real, 0, None, closed="left")],
        "augment": [StrOptions({"auto", *AUGMENT_PRESETS})],
        "drop_rate": [Interval(Real, 0, 1, closed="left"), None],
        "drop_path_rate": [Interval(Real, 0, 1, closed="left"), None],
        "validation_fraction": [Interval(Real, 0, 1, closed="neither")],
        "early_stopping": ["boolean"],
        "patience": [Interval(Integral, 1, None, closed="left")],
        "random_state": ["random_state"],
        "warm_start": ["boolean"],
    }

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False  # X holds images, not a feature matrix
        tags.target_tags.required = True
        return tags

    # -- subclass hooks ---------------------------------------------------------------------------

    def _prepare_targets(self, y, n: int, warm: bool):
        """Validate ``y``; return ``(targets tensor for the loss, stratification labels or None,
        number of network outputs)`` and set the target-describing fitted attributes."""
        raise NotImplementedError

    def _per_sample_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _validation_score(self, outputs: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> float:
        raise NotImplementedError

    def _loss_weights(self, y, sample_weight, n: int) -> np.ndarray:
        return _check_sample_weight(sample_weight, n)

    def _init_head(self, model, n_outputs: int) -> None:
        # Every fresh head starts at zero (as Big Transfer does): uniform class probabilities, or the
        # training mean for regression, instead of large random logits that jolt a pretrained body.
        # Whatever the weights' name, spelling or source, only build_model knows whether the head came
        # from the weights (same outputs as theirs); it says so in ``model.head_from_weights``.
        if not getattr(model, "head_from_weights", False):
            head = model.get_classifier()
            torch.nn.init.zeros_(head.weight)
            torch.nn.init.zeros_(head.bias)

    # -- fit ----------------------------------------------------------------------------------------

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y, sample_weight=None):
        """Fine-tune on images ``X`` and targets ``y``.

        Parameters
        ----------
        X : images
            Any input :mod:`effsk.data.images` accepts: paths, encoded bytes, PIL images, arrays, an
            (N,H,W,C) array or an (N,C,H,W) tensor.
        y : array-like
            Targets, one per image.
        sample_weight : array-like of shape (n_samples,), optional
            Per-image loss weights.

        Returns
        -------
        self
        """
        n = num_images(X)
        if n < 2:
            raise ValueError(f"X has {n} image(s); fitting needs at least 2")
        y_len = _num_targets(y)
        if y_len != n:
            raise ValueError(f"X has {n} images but y has {y_len} targets; they must have the same length")
        warm = self.warm_start and hasattr(self, "model_")
        targets, stratify, n_outputs = self._prepare_targets(y, n, warm)
        weights = torch.as_tensor(self._loss_weights(y, sample_weight, n), dtype=torch.float32)

        seed = int(check_random_state(self.random_state).randint(np.iinfo(np.int32).max))
        train_idx, val_idx = self._split(n, stratify, seed)
        self._check_weights(weights, train_idx)
        device = resolve_device(self.device)
        with forked_rng(device):
            torch.manual_seed(seed)
            if not warm:
                self._build(n_outputs)
                self.history_ = []
            loss = IndexedLoss(self._per_sample_loss, targets, weights)
            metric = _IndexedMetric(self._validation_score, loss)
            self._train(X, train_idx, val_idx, loss, metric, seed, device, warm)
        self.model_.cpu()  # the fitted network rests on the CPU; predictions run on a prepared copy
        return self

    def _build(self, n_outputs: int) -> None:
        build_kwargs = dict(drop_rate=self.drop_rate)
        if self.drop_path_rate is not None:
            build_kwargs["drop_path_rate"] = self.drop_path_rate
        model, preprocessing = build_estimator_model(self, num_classes=n_outputs, **build_kwargs)
        self._init_head(model, n_outputs)
        self.model_ = model
        self.preprocessing_ = input_preprocessing(self, preprocessing)

    def _split(self, n: int, stratify, seed: int):
        if not self.early_stopping:
            return np.arange(n), None
        return holdout_split(
            n, self.validation_fraction, seed=seed, stratify=stratify, purpose=" for early stopping",
            remedy="Use more images, a larger validation_fraction, or early_stopping=False.",
        )

    @staticmethod
    def _check_weights(weights: torch.Tensor, train_idx: np.ndarray) -> None:
        if not weights[torch.as_tensor(train_idx)].sum() > 0:
            raise ValueError("the sample weights of the training images sum to zero")

    def _freeze_schedule(self, warm: bool) -> list[tuple[str, str | int, int]]:
        """``(phase, freeze mode, epochs)`` pairs: the head alone first when starting from
        pretrained weights, then the chosen mode (fastai's fine_tune idea).

        ``"auto"`` keeps pretrained BatchNorm statistics as loaded (``"bn"``) in both phases, so the
        features the head learnt on do not change when the backbone joins: switching BatchNorm from
        the loaded statistics to those of 32-image batches made the training loss jump at the phase
        boundary and cost 3 to 15 points of test accuracy on benchmarks/transfer.py. From random
        weights BatchNorm must learn its statistics (``"none"``).
        """
        pretrained = self.weights is not None
        freeze = self.freeze
        if freeze == "auto":
            freeze = "bn" if pretrained else "none"
        head = 0
        if pretrained and not warm and freeze != "backbone":
            head = min(self.head_epochs, self.max_epochs)
        phases = [("head", "backbone", head), ("train", freeze, self.max_epochs - head)]
        return [p for p in phases if p[2] > 0]

    def _augment_preset(self) -> str:
        """``augment``, with ``"auto"`` resolved: short fine-tunes of pretrained weights scored
        higher without augmentation; training from random weights needs it."""
        if self.augment != "auto":
            return self.augment
        return "none" if self.weights is not None else "light"

    def _phase_settings(self, phase: str, freeze, epochs: int) -> dict:
        """The :class:`TrainConfig` settings that shape what a phase does to the weights: optimiser,
        learning rates per parameter group, warm-up and schedule, freezing and BatchNorm handling.

        The head phase (and any phase with ``freeze="backbone"``) has no warm-up: a zero-initialised head on frozen features has nothing to
        protect from early large steps, and a warm-up inside one short epoch only starves it. When
        pretrained layers join, they train at ``BACKBONE_LR_SCALE * lr`` and every rate warms up
        over ``min(1, epochs / 2)`` epochs, so the head's first gradients (from a head trained for
        a single epoch) do not yank the pretrained weights.
        """
        pretrained = self.weights is not None
        settings = dict(
            max_epochs=epochs,
            optimizer=self.optimizer,
            lr=self.lr,
            weight_decay=self.weight_decay,
            schedule="cosine",
            warmup_epochs=min(1.0, epochs / 10),
            freeze=freeze,
            precise_bn_batches=PRECISE_BN_BATCHES,
        )
        if phase == "head" or freeze == "backbone":  # only the head trains: nothing pretrained to protect
            settings["warmup_epochs"] = 0.0
        elif pretrained:
            settings.update(backbone_lr_scale=BACKBONE_LR_SCALE, warmup_epochs=min(1.0, epochs / 2))
        return settings

    def _train(self, X, train_idx, val_idx, loss, metric, seed, device, warm) -> None:
        data = _FitData(self, X, train_idx, val_idx, seed, device)
        schedule = self._freeze_schedule(warm)
        total_epochs = len(self.history_) + sum(epochs for _, _, epochs in schedule)
        for phase, freeze, epochs in schedule:
            config = TrainConfig(
                **self._phase_settings(phase, freeze, epochs),
                early_stopping=self.early_stopping and phase == "train",
                patience=self.patience,
                device=device,
                precision=self.precision,
                seed=seed + len(self.history_),
                verbose=self.verbose,
                epoch_offset=len(self.history_),
                total_epochs=total_epochs,
                phase=phase,
            )
            trainer = data.trainer(self.model_, config, loss, metric)
            offset = len(self.history_)
            history = trainer.fit()
            for record in history:
                self.history_.append({**record, "epoch": offset + record["epoch"], "phase": phase})
            # the epoch whose weights the model now holds
            self.best_epoch_ = offset + (trainer.best_epoch if config.early_stopping else len(history) - 1)
        self.model_.eval()


# Pooled backbone features of the training images are kept in memory (rather than recomputed every
# epoch) up to this size.
_FEATURE_CACHE_BYTES = 1 << 30


class _FitData:
    """The batches one fit trains on: images for the phases that train the backbone; for a phase that
    trains the head alone (``freeze="backbone"``), the backbone's pooled features, computed without
    autograd, and only once when the images do not change from epoch to epoch (no augmentation)."""

    def __init__(self, estimator, X, train_idx, val_idx, seed: int, device: torch.device):
        self.estimator, self.X, self.train_idx, self.val_idx, self.device = estimator, X, train_idx, val_idx, device
        self.batch_size = min(estimator.batch_size, len(train_idx))
        self.drop_last = len(train_idx) % self.batch_size == 1  # BatchNorm cannot train on a batch of one
        self.generator = torch.Generator().manual_seed(seed)
        self.num_workers = resolve_num_workers(estimator.num_workers, device)
        self._fixed_features = None

    def trainer(self, model, config: TrainConfig, loss, metric) -> Trainer:
        """The Trainer of one phase: on backbone features when only the head trains."""
        head_only = config.freeze == "backbone" and hasattr(model, "forward_features") and hasattr(model, "forward_head")
        if head_only:
            train_loader, val_loader = self._feature_loaders(model, config)
        else:
            self._fixed_features = None  # the backbone trains: its features change
            train_loader = self._image_loader(self.train_idx, self.estimator._augment_preset(), shuffle=True)
            val_loader = None if self.val_idx is None else self._image_loader(self.val_idx, "none")
        return Trainer(model, train_loader, val_loader, config, loss_fn=loss, metric_fn=metric, head_only=head_only)

    def _image_loader(self, idx: np.ndarray, augment: str, shuffle: bool = False):
        preprocessing = self.estimator.preprocessing_
        loader = make_loader(
            _safe_indexing(self.X, idx),
            preprocessing,
            transform=train_transform(preprocessing, augment),
            targets=idx,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
            generator=self.generator if shuffle else None,
            drop_last=self.drop_last and shuffle,
        )
        return _Renumbered(loader, idx)

    def _feature_loaders(self, model, config: TrainConfig):
        channels_last = prefers_channels_last(self.device) if config.channels_last is None else config.channels_last
        model.to(self.device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
        amp_dtype = resolve_precision(config.precision, self.device)
        features = BackboneFeatures(model, device=self.device, amp_dtype=amp_dtype, channels_last=channels_last)
        if self._fixed_features is None:
            with forked_rng(self.device):  # loaders draw their seeds: leave dropout's draws as they would be
                self._fixed_features = self._features_once(features, getattr(model, "num_features", None))
        train, val = self._fixed_features
        if train is None:  # augmented, or too many to keep: computed batch by batch, every epoch
            train_loader = _FeatureBatches(self._image_loader(self.train_idx, self.estimator._augment_preset(), shuffle=True), features)
        else:
            train_loader = self._rows_loader(*train, shuffle=True)
        return train_loader, None if val is None else self._rows_loader(*val)

    def _features_once(self, features: BackboneFeatures, num_features: int | None):
        """``(train, val)`` ``(features, targets)`` pairs that stay the same from epoch to epoch: the
        validation images', and the training images' when not augmented and within the cache size."""
        val = None if self.val_idx is None else features.of_loader(self._image_loader(self.val_idx, "none"))
        train = None
        fits = num_features is not None and len(self.train_idx) * num_features * 4 <= _FEATURE_CACHE_BYTES
        if self.estimator._augment_preset() == "none" and fits:
            train = features.of_loader(self._image_loader(self.train_idx, "none"))
        return train, val

    def _rows_loader(self, features: torch.Tensor, targets: torch.Tensor, shuffle: bool = False):
        """Batches of feature rows drawn as the image loaders draw images (same sampler and generator)."""
        return DataLoader(
            _Rows(features, targets),
            batch_size=self.batch_size,
            shuffle=shuffle,
            generator=self.generator if shuffle else None,
            drop_last=self.drop_last and shuffle,
            collate_fn=_as_batch,
        )


class _Rows(Dataset):
    """Rows of tensors, fetched a batch at a time."""

    def __init__(self, *tensors: torch.Tensor):
        self.tensors = tensors

    def __len__(self) -> int:
        return len(self.tensors[0])

    def __getitem__(self, i):
        return tuple(t[i] for t in self.tensors)

    def __getitems__(self, rows):
        index = torch.as_tensor(rows)
        return tuple(t[index] for t in self.tensors)


def _as_batch(batch):
    return batch


class _LoaderView:
    """A loader seen through another lens; its length, sampler, generator and batch size are the
    loader's (the trainer seeds and resumes through them)."""

    def __init__(self, loader):
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name):
        if name == "loader":
            raise AttributeError(name)
        return getattr(self.loader, name)


class _FeatureBatches(_LoaderView):
    """A loader of ``(images, targets)`` seen as ``(backbone features, targets)``."""

    def __init__(self, loader, features: BackboneFeatures):
        super().__init__(loader)
        self.features = features

    def __iter__(self):
        for inputs, targets in self.loader:
            yield self.features(inputs), targets


class _IndexedMetric:
    def __init__(self, score, loss: IndexedLoss):
        self.score, self.loss = score, loss

    def __call__(self, outputs: torch.Tensor, index: torch.Tensor) -> float:
        targets, weights = self.loss.lookup(index)
        return float(self.score(outputs, targets, weights))


class _Renumbered(_LoaderView):
    """A loader over a subset of X whose decoding errors name the position in the caller's X."""

    def __init__(self, loader, positions: np.ndarray):
        super().__init__(loader)
        self.positions = positions

    def __iter__(self):
        try:
            yield from self.loader
        except ImageLoadError as exc:
            index = getattr(exc, "index", None)
            if index is None:
                raise
            original = int(self.positions[index])
            reason = exc.__cause__ if exc.__cause__ is not None else exc
            raise ImageLoadError(f"cannot load image {original} of X: {reason}", index=original) from exc


def _num_targets(y) -> int:
    if hasattr(y, "shape") and len(getattr(y, "shape")) > 0:
        return int(y.shape[0])
    try:
        return len(y)
    except TypeError:
        raise ValueError(f"y must be array-like, got {type(y).__name__}") from None


def _check_sample_weight(sample_weight, n: int) -> np.ndarray:
    if sample_weight is None:
        return np.ones(n)
    w = np.asarray(sample_weight, dtype=np.float64)
    if w.ndim == 0:
        return np.full(n, float(w))
    if w.shape != (n,):
        raise ValueError(f"sample_weight has shape {w.shape}; expected ({n},), one weight per image")
    bad = np.flatnonzero(~np.isfinite(w) | (w < 0))
    if bad.size:
        raise ValueError(f"sample_weight must be finite and >= 0; got {w[bad[0]]} at index {bad[0]}")
    return w
