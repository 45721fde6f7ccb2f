"""The scikit-learn face of effsk: featurizer, classifier, regressor, and their shared base."""

from .classifier import EfficientNetClassifier
from .featurizer import EfficientNetFeaturizer
from .regressor import EfficientNetRegressor

__all__ = ["EfficientNetFeaturizer", "EfficientNetClassifier", "EfficientNetRegressor"]
