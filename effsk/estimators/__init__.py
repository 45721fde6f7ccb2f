"""The scikit-learn face of effsk: featurizer, classifier, regressor, and their shared base.

Layer 5. May import training, weights, data, nn, scaling and utils; only the jobs and the command
line sit above it.
"""

from .classifier import EfficientNetClassifier
from .featurizer import EfficientNetFeaturizer
from .regressor import EfficientNetRegressor

__all__ = ["EfficientNetFeaturizer", "EfficientNetClassifier", "EfficientNetRegressor"]
