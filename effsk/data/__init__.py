"""Image data: every input type to pixels, the preprocessing that travels with weights, transforms,
labelled image sources, the per-image feature cache, and small sample sets.

Layer 2. Owns :mod:`.images` (decode + streaming loaders), :mod:`.preprocessing` (the config),
:mod:`.transforms` (eval and train transforms), :mod:`.datasets` (folders and tables of labelled images),
:mod:`.cache` (feature rows keyed on image content) and :mod:`.samples`. May import
:mod:`effsk.scaling` and :mod:`effsk.utils`; never networks, weights, training or estimators.
"""

from .images import ImageLoadError, ImageLoadWarning, load_image, make_loader, num_images
from .preprocessing import Preprocessing
from .samples import digits_rgb
from .transforms import AUGMENT_PRESETS, eval_transform, train_transform

__all__ = [
    "ImageLoadError",
    "ImageLoadWarning",
    "load_image",
    "make_loader",
    "num_images",
    "Preprocessing",
    "eval_transform",
    "train_transform",
    "AUGMENT_PRESETS",
    "digits_rgb",
]
