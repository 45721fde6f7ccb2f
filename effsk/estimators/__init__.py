"""The scikit-learn face of effsk: featurizer, classifier, regressor."""

from .classifier import EfficientNetClassifier
from .regressor import EfficientNetRegressor

__all__ = ["EfficientNetClassifier", "EfficientNetRegressor"]
