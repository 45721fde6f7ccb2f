"""effsk: scikit-learn-style feature extraction and transfer learning with the EfficientNet family.

The top of the layer stack: it re-exports the public names (estimators, ``pretrain``, ``resolve``,
``search_coefficients``) lazily, so that ``import effsk`` and ``effsk --help`` stay fast. Layers, bottom
to top: scaling and utils, nn, data, weights, training, estimators, jobs, cli (see README, Development).
"""

from importlib import import_module

from ._version import __version__

# Public names resolve lazily so that ``import effsk`` (and ``effsk --help``) stays fast.
_PUBLIC = {
    "EfficientNetFeaturizer": "effsk.estimators",
    "EfficientNetClassifier": "effsk.estimators",
    "EfficientNetRegressor": "effsk.estimators",
    "pretrain": "effsk.training.pretraining",
    "resolve": "effsk.scaling",
    "search_coefficients": "effsk.training.search",
}

__all__ = list(_PUBLIC)


def __getattr__(name):
    if name in _PUBLIC:
        return getattr(import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'effsk' has no attribute {name!r}")


def __dir__():
    return sorted([*__all__, "__version__"])
