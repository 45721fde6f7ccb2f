"""Weights: where they come from (published sources, the Lite packages, effsk checkpoints, plain
state_dicts), how foreign layouts convert to effsk's, and the one path that builds a filled model.

Layer 3. Owns :mod:`.build` (:func:`build_model`), :mod:`.checkpoint` (the effsk file format, safe
reading) and :mod:`.lite` (Lite key conversion). May import :mod:`effsk.nn`, :mod:`effsk.data`
(preprocessing travels with weights), :mod:`effsk.scaling` and :mod:`effsk.utils`; never training,
estimators or the command line. Every file is read with ``torch.load(weights_only=True)``.
"""

from .build import (
    WeightsNotFoundError,
    build_model,
    imagenet_cache_path,
    imagenet_weights_file,
    imagenet_weights_status,
    torchvision_weights,
)
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint

__all__ = [
    "build_model",
    "torchvision_weights",
    "imagenet_cache_path",
    "imagenet_weights_file",
    "imagenet_weights_status",
    "save_checkpoint",
    "load_checkpoint",
    "CheckpointError",
    "WeightsNotFoundError",
]
