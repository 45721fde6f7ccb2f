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

from ._finetune import FineTuneEstimator, _check_sample_weight

__all__ = ["EfficientNetClassifier"]


class EfficientNetClassifier(ClassifierMixin, FineTuneEstimator):
    """Fine-tune an EfficientNet to classify images (single- or multi-label).

    Parameters
    ----------
    phi : str or float, default="b0"
        Published variant (``"b0"``..``"b7"``, ``"lite0"``..``"lite4"``) or compound coefficient >= 0.
    weights : {"imagenet"}, path or None, default="imagenet"
        Starting weights (a head of another size is replaced by a fresh one, initialised at zero).
        ``None``: random initialisation.
    scaling : {"official", "compound"}, default="official"
        How a numeric phi resolves (see :func:`effsk.scaling.resolve`).
    arch : {"efficientnet", "resnet50", "mobilenet_v2", "mobilenet_v1"}, default="efficientnet"
        The network phi scales; the compound-scaled baselines of paper Table 3 are built the same way.
    alpha, beta, gamma : float, default=None
        Compound bases; ``None`` uses the arch's own (EfficientNet: 1.2, 1.1, 1.15).
        Compound-scaling bases (used with ``scaling="compound"``).
    resolution : int, optional
        Train and predict at this crop size instead of the variant's.
    freeze : {"auto", "none", "backbone", "bn"} or int, default="auto"
        What stays fixed while training. ``"none"``: nothing. ``"backbone"``: only the classifier
        head trains (BatchNorm statistics frozen too). int k: the stem and the first k stages are
        frozen. ``"bn"``: every weight trains, BatchNorm statistics stay as loaded. ``"auto"`` is
        ``"none"``: with pretrained weights, the head first trains alone for ``head_epochs``.
    head_epochs : int, default=1
        Epochs (out of ``max_epochs``) to train the head alone before unfreezing, when starting from
        pretrained weights (fastai's ``fine_tune``). Ignored with ``weights=None``,
        ``freeze="backbone"`` and warm starts.
    max_epochs : int, default=10
        Epochs in all, head epochs included.
    lr : float, default=1e-3
        Peak learning rate, reached after a warm-up (the first tenth of each phase, at most one
        epoch) and followed by a cosine decay.
    batch_size : int, default=32
    optimizer : {"adamw", "sgd", "rmsprop"}, default="adamw"
    weight_decay : float, default=0.01
        Not applied to biases and normalisation parameters.
    label_smoothing : float, default=0.1
        Single-label only.
    augment : {"none", "light", "randaugment", "autoaugment"}, default="light"
        Training-time augmentation (see :mod:`effsk.data.transforms`).
    drop_rate, drop_path_rate : float, optional
        Classifier dropout and stochastic depth (default: the variant's).
    validation_fraction : float, default=0.1
        Share of the images held out (stratified by class) for early stopping.
    early_stopping : bool, default=True
        Stop when the validation loss has not improved for ``patience`` epochs; keep the best weights.
    patience : int, default=3
    class_weight : dict, "balanced" or None, default=None
        Loss weight per class, as in scikit-learn (``"balanced"``: n_samples / (n_classes * count)).
        Multiplies ``sample_weight``. Single-label only.
    device : str, default="auto"
    precision : {"auto", "fp32", "bf16", "fp16"}, default="auto"
    num_workers : int, default=0
        DataLoader workers.
    random_state : int, RandomState or None, default=None
        Seeds the initialisation, the validation split, shuffling, augmentation and dropout. Fits
        with the same int on CPU give identical predictions.
    verbose : int, default=0
        Progress bars and one line per epoch.
    warm_start : bool, default=False
        Continue from the fitted weights (same classes) instead of starting over.

    Attributes
    ----------
    classes_ : ndarray
        Class labels (for multi-label ``y``: ``arange(n_labels)``).
    multilabel_ : bool
    model_ : torch.nn.Module
        The fine-tuned network (eval mode).
    preprocessing_ : effsk.data.preprocessing.Preprocessing
    history_ : list of dict
        One record per epoch: ``epoch``, ``phase`` (``"head"``/``"train"``), ``train_loss``,
        ``val_loss``, ``val_score`` (accuracy), ``lr``, ``seconds``, ``images_per_second``.
    best_epoch_ : int
        Index in ``history_`` of the epoch whose weights the model holds.

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
        freeze="auto",
        head_epochs=1,
        max_epochs=10,
        lr=1e-3,
        batch_size=32,
        optimizer="adamw",
        weight_decay=0.01,
        label_smoothing=0.1,
        augment="light",
        drop_rate=None,
        drop_path_rate=None,
        validation_fraction=0.1,
        early_stopping=True,
        patience=3,
        class_weight=None,
        device="auto",
        precision="auto",
        num_workers=0,
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
