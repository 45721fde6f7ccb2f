"""EfficientNetClassifier: fine-tune an EfficientNet on labelled images, scikit-learn style."""

from __future__ import annotations

from numbers import Real

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.base import ClassifierMixin
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.class_weight import compute_sample_weight
from sklearn.utils.multiclass import type_of_target
from sklearn.utils.validation import check_is_fitted, column_or_1d

from ._base import DEFAULT_CROP, document_parameters
from ._finetune import FINETUNE_PARAMETER_DOCS, FineTuneEstimator, _check_sample_weight

__all__ = ["EfficientNetClassifier"]


@document_parameters(FINETUNE_PARAMETER_DOCS)
class EfficientNetClassifier(ClassifierMixin, FineTuneEstimator):
    """Fine-tune an EfficientNet to classify images (single- or multi-label).

    Parameters
    ----------
    {model_parameters}
    {training_parameters}
    label_smoothing : float, default=0.1
        Single-label only.
    class_weight : dict, "balanced" or None, default=None
        Loss weight per class, as in scikit-learn (``"balanced"``: n_samples / (n_classes * count)).
        Multiplies ``sample_weight``. Single-label only.
    {runtime_parameters}

    Attributes
    ----------
    classes_ : ndarray
        Class labels (for multi-label ``y``: ``arange(n_labels)``).
    multilabel_ : bool
        Whether ``y`` was a multi-label indicator matrix.
    {fitted_attributes}

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> X = rng.integers(0, 256, size=(8, 32, 32, 3), dtype=np.uint8)
    >>> y = ["cat", "dog"] * 4
    >>> clf = EfficientNetClassifier("b0", weights=None, resolution=32, max_epochs=1,
    ...                              early_stopping=False, batch_size=4, random_state=0).fit(X, y)
    >>> clf.predict_proba(X[:2]).shape, clf.classes_.tolist(), len(clf.history_)
    ((2, 2), ['cat', 'dog'], 1)
    """

    _parameter_constraints: dict = {
        **FineTuneEstimator._parameter_constraints,
        "label_smoothing": [Interval(Real, 0, 1, closed="left")],
        "class_weight": [StrOptions({"balanced"}), dict, None],
    }

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
        label_smoothing=0.1,
        augment="auto",
        drop_rate=None,
        drop_path_rate=None,
        validation_fraction=0.1,
        early_stopping=True,
        patience=3,
        class_weight=None,
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
        self.label_smoothing = label_smoothing
        self.augment = augment
        self.drop_rate = drop_rate
        self.drop_path_rate = drop_path_rate
        self.validation_fraction = validation_fraction
        self.early_stopping = early_stopping
        self.patience = patience
        self.class_weight = class_weight
        self.device = device
        self.precision = precision
        self.num_workers = num_workers
        self.random_state = random_state
        self.verbose = verbose
        self.warm_start = warm_start

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_label = True
        return tags

    # -- targets and loss -------------------------------------------------------------------------

    def _prepare_targets(self, y, n, warm):
        y = _as_label_array(y)
        y_type = type_of_target(y, input_name="y")
        if y_type not in ("binary", "multiclass", "multilabel-indicator"):
            raise ValueError(
                f"y looks {y_type}; EfficientNetClassifier takes class labels (1-D) or a 0/1 indicator "
                "matrix (multi-label). For continuous targets use EfficientNetRegressor."
            )
        multilabel = y_type == "multilabel-indicator"
        if multilabel:
            if self.class_weight is not None:
                raise ValueError("class_weight is not supported with multi-label y; use sample_weight")
            classes = np.arange(y.shape[1])
            targets = torch.as_tensor(y.astype(np.float32))
            stratify = None
        else:
            classes, encoded = np.unique(y, return_inverse=True)
            if len(classes) < 2:
                raise ValueError(f"y has a single class ({classes[0]!r}); a classifier needs at least two classes")
            targets = torch.as_tensor(encoded, dtype=torch.int64)
            stratify = encoded
        if warm and (multilabel != self.multilabel_ or not np.array_equal(classes, self.classes_)):
            raise ValueError(
                f"warm_start=True needs the classes of the first fit ({list(self.classes_)}); y has {list(classes)}"
            )
        self.classes_, self.multilabel_ = classes, multilabel
        return targets, stratify, len(classes)

    def _loss_weights(self, y, sample_weight, n):
        weights = _check_sample_weight(sample_weight, n)
        if self.class_weight is not None:
            weights = weights * compute_sample_weight(self.class_weight, _as_label_array(y))
        return weights

    def _per_sample_loss(self, outputs, targets):
        if self.multilabel_:
            return F.binary_cross_entropy_with_logits(outputs, targets, reduction="none").mean(dim=1)
        return F.cross_entropy(outputs, targets, reduction="none", label_smoothing=self.label_smoothing)

    def _validation_score(self, outputs, targets, weights):
        if self.multilabel_:
            correct = ((outputs > 0) == (targets > 0.5)).all(dim=1)
        else:
            correct = outputs.argmax(dim=1) == targets
        return ((correct.float() * weights).sum() / weights.sum()).item()

    # -- prediction -------------------------------------------------------------------------------

    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities, ``(n_samples, n_classes)``; per-label probabilities for multi-label."""
        logits = self._forward(X).double()
        probs = torch.sigmoid(logits) if self.multilabel_ else torch.softmax(logits, dim=1)
        return probs.numpy()

    def predict_log_proba(self, X) -> np.ndarray:
        """Log of :meth:`predict_proba`."""
        logits = self._forward(X).double()
        logp = F.logsigmoid(logits) if self.multilabel_ else torch.log_softmax(logits, dim=1)
        return logp.numpy()

    def predict(self, X) -> np.ndarray:
        """Class labels; for multi-label, a 0/1 indicator matrix (probability > 0.5)."""
        proba = self.predict_proba(X)
        if self.multilabel_:
            return (proba > 0.5).astype(np.int64)
        return self.classes_[proba.argmax(axis=1)]

    def score(self, X, y, sample_weight=None) -> float:
        """Accuracy (subset accuracy for multi-label). Labels unseen in fit are an error."""
        check_is_fitted(self, "model_")
        if not self.multilabel_:
            labels = _as_label_array(y)
            unseen = ~np.isin(labels, self.classes_)
            if unseen.any():
                first = int(np.flatnonzero(unseen)[0])
                raise ValueError(
                    f"y contains labels not seen during fit: {sorted(set(labels[unseen].tolist()), key=str)[:10]} "
                    f"(first at index {first}); the classifier knows {list(self.classes_)}"
                )
        return super().score(X, y, sample_weight=sample_weight)


def _as_label_array(y) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = column_or_1d(y, warn=True)
    if y.dtype.kind == "f":
        bad = np.flatnonzero(~np.isfinite(y).reshape(len(y), -1).all(axis=1))
        if bad.size:
            raise ValueError(f"y contains NaN or infinite labels (first at index {bad[0]})")
    return y
