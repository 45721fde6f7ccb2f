"""EfficientNetRegressor: fine-tune an EfficientNet to predict continuous targets from images."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.base import RegressorMixin
from sklearn.metrics import r2_score

from ._base import DEFAULT_CROP, document_parameters
from ._finetune import FINETUNE_PARAMETER_DOCS, FineTuneEstimator

__all__ = ["EfficientNetRegressor"]


_REGRESSION_DOCS = {
    "augment": """\
augment : {"none", "light", "randaugment", "autoaugment"}, default="none"
    Training-time augmentation (see :mod:`effsk.data.transforms`). Off by default: the presets'
    random crops and flips change any target that depends on position, size or orientation (a
    length, a count, a coordinate); choose one when the target is invariant to them.""",
}


@document_parameters(FINETUNE_PARAMETER_DOCS, _REGRESSION_DOCS)
class EfficientNetRegressor(RegressorMixin, FineTuneEstimator):
    """Fine-tune an EfficientNet to regress one or several continuous targets from images.

    Targets are standardised internally (zero mean, unit variance per target) and the loss is the
    (sample-weighted) mean squared error on that scale; :meth:`predict` returns the original units
    and :meth:`score` is R^2. The regression head starts at zero, so the first predictions are the
    training mean.

    Parameters
    ----------
    {model_parameters}
    {training_parameters}
    {runtime_parameters}

    Attributes
    ----------
    n_outputs_ : int
        Number of targets.
    single_output_ : bool
        Whether ``y`` was 1-D; :meth:`predict` then returns shape ``(n_samples,)``.
    target_mean_, target_scale_ : ndarray of shape (n_outputs_,)
        The standardisation of ``y``.
    {fitted_attributes}

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> X = rng.integers(0, 256, size=(8, 32, 32, 3), dtype=np.uint8)
    >>> y = X.mean(axis=(1, 2, 3))
    >>> reg = EfficientNetRegressor("b0", weights=None, resolution=32, max_epochs=1,
    ...                             early_stopping=False, batch_size=4, random_state=0).fit(X, y)
    >>> reg.predict(X[:3]).shape
    (3,)
    """

    def __init__(
        self,
        phi="b0",
        *,
        weights="imagenet",
        arch="efficientnet",
        scaling="official",
        alpha=None,
        beta=None,
        gamma=None,
        resolution=None,
        crop=DEFAULT_CROP,
        freeze="auto",
        head_epochs=1,
        max_epochs=10,
        lr=1e-3,
        batch_size=32,
        optimizer="adamw",
        weight_decay=0.01,
        augment="none",
        drop_rate=None,
        drop_path_rate=None,
        validation_fraction=0.1,
        early_stopping=True,
        patience=3,
        device="auto",
        precision="auto",
        num_workers="auto",
        random_state=None,
        verbose=0,
        warm_start=False,
    ):
        self.phi = phi
        self.weights = weights
        self.scaling = scaling
        self.arch = arch
        self.alpha = alpha
        self.beta = beta
        self.gamma = gamma
        self.resolution = resolution
        self.crop = crop
        self.freeze = freeze
        self.head_epochs = head_epochs
        self.max_epochs = max_epochs
        self.lr = lr
        self.batch_size = batch_size
        self.optimizer = optimizer
        self.weight_decay = weight_decay
        self.augment = augment
        self.drop_rate = drop_rate
        self.drop_path_rate = drop_path_rate
        self.validation_fraction = validation_fraction
        self.early_stopping = early_stopping
        self.patience = patience
        self.device = device
        self.precision = precision
        self.num_workers = num_workers
        self.random_state = random_state
        self.verbose = verbose
        self.warm_start = warm_start

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        return tags

    def _prepare_targets(self, y, n, warm):
        try:
            y = np.asarray(y, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"y must be numeric for a regressor: {exc}") from None
        if y.ndim not in (1, 2):
            raise ValueError(f"y must be 1-D or 2-D (n_samples, n_targets), got shape {y.shape}")
        bad = np.flatnonzero(~np.isfinite(y.reshape(n, -1)).all(axis=1))
        if bad.size:
            raise ValueError(f"y contains NaN or infinite targets (first at index {bad[0]}); drop or impute them")
        y2 = y.reshape(n, -1)
        if warm:
            if y2.shape[1] != self.n_outputs_:
                raise ValueError(f"warm_start=True needs {self.n_outputs_} target(s) as in the first fit; y has {y2.shape[1]}")
        else:
            scale = y2.std(axis=0)
            self.target_mean_ = y2.mean(axis=0)
            self.target_scale_ = np.where(scale > 0, scale, 1.0)
            self.n_outputs_ = y2.shape[1]
            self.single_output_ = y.ndim == 1
        targets = torch.as_tensor((y2 - self.target_mean_) / self.target_scale_, dtype=torch.float32)
        return targets, None, self.n_outputs_

    def _per_sample_loss(self, outputs, targets):
        return (outputs - targets).pow(2).mean(dim=1)

    def _validation_score(self, outputs, targets, weights):
        if len(targets) < 2:
            return float("nan")
        return r2_score(targets.numpy(), outputs.numpy(), sample_weight=weights.numpy())

    def predict(self, X) -> np.ndarray:
        """Predicted targets in the units of ``y``: ``(n_samples,)`` or ``(n_samples, n_outputs)``."""
        out = self._forward(X).double().numpy() * self.target_scale_ + self.target_mean_
        return out.ravel() if self.single_output_ else out
