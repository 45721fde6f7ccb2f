"""The scikit-learn face of effsk: featurizer, classifier, regressor, and their shared base."""

from .featurizer import EfficientNetFeaturizer

__all__ = ["EfficientNetFeaturizer"]
