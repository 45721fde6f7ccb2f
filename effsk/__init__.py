"""effsk: scikit-learn-style feature extraction and transfer learning with the EfficientNet family."""

from importlib import import_module

__version__ = "0.1.0"

# Public names resolve lazily so that ``import effsk`` (and ``effsk --help``) stays fast.
_PUBLIC = {
    "EfficientNetFeaturizer": "effsk.estimators",
    "EfficientNetClassifier": "effsk.estimators",
    "EfficientNetRegressor": "effsk.estimators",
    "pretrain": "effsk.pretraining",
    "resolve": "effsk.scaling",
}

__all__ = list(_PUBLIC)


def __getattr__(name):
    if name in _PUBLIC:
        return getattr(import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'effsk' has no attribute {name!r}")
