"""Preprocessing configs: how raw images become model input. They travel with the weights.

Semantics are torchvision's ImageClassification eval transform: resize the shorter side to
``resize_size`` with ``interpolation``, centre-crop ``crop_size``, scale to [0, 1], normalise. The
``crop`` policy may replace the resize-and-crop step (the whole image squashed or letterboxed, another
crop fraction, or a choice by image size); :func:`effsk.data.transforms.eval_transform` applies it.

This module holds the recipes (torchvision's crop fraction, the TF reference's crop padding); which
recipe a published variant's weights use is recorded once, in :mod:`effsk.weights.registry`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from numbers import Real

from ..scaling import Scaling

__all__ = [
    "Preprocessing",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "LITE_MEAN",
    "LITE_STD",
    "tf_preprocessing",
    "default_preprocessing",
    "CROP_POLICIES",
    "check_crop",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# TF Lite models take (x - 127) / 128 in pixel units, i.e. mean 127/255, std 128/255 on [0, 1].
LITE_MEAN = (127 / 255,) * 3
LITE_STD = (128 / 255,) * 3
INTERPOLATIONS = ("nearest", "bilinear", "bicubic")
# torchvision's classic eval recipe: the crop is 87.5% of the resized shorter side.
_CROP_FRACTION = 0.875
# The TF reference eval crop: centre crop of resolution / (resolution + 32) of the shorter side, bicubic.
_TF_CROP_PADDING = 32
#: Named crop policies; a float in (0, 1] is a crop fraction instead (see :class:`Preprocessing`).
CROP_POLICIES = ("center", "squash", "letterbox", "auto")


def check_crop(crop):
    """``crop`` as stored: one of :data:`CROP_POLICIES`, or a crop fraction in (0, 1] as a float.

    >>> check_crop(0.95), check_crop("squash")
    (0.95, 'squash')
    """
    if isinstance(crop, str) and crop in CROP_POLICIES:
        return crop
    if isinstance(crop, Real) and not isinstance(crop, bool) and 0 < crop <= 1:
        return float(crop)
    raise ValueError(f"crop={crop!r}; use one of {CROP_POLICIES} or a crop fraction in (0, 1] such as 0.95")


@dataclass(frozen=True)
class Preprocessing:
    """Resize-shorter-side, centre-crop, normalise; or another ``crop`` policy.

    ``crop`` says which part of the image becomes the ``crop_size`` square:

    - ``"center"`` (the weights' published eval recipe): resize the shorter side to ``resize_size``,
      centre-crop ``crop_size``. Cuts the borders, and the object when it fills the frame.
    - ``"squash"``: resize the whole image to ``crop_size`` x ``crop_size`` (aspect ratio not kept).
    - ``"letterbox"``: resize the longer side to ``crop_size`` and pad the rest of the square with the
      mean colour (zero after normalisation), centred.
    - a float in (0, 1]: a crop fraction, as timm's ``crop_pct``: resize the shorter side to
      ``floor(crop_size / crop)``, centre-crop ``crop_size`` (``1.0`` cuts only the longer side).
    - ``"auto"``: ``"squash"`` for an image whose shorter side is below ``resize_size`` (one the
      centre recipe would upscale: small images fill their frame), ``"center"`` otherwise.

    ``"center"`` is the default, so a stored dict without ``crop`` reads as before.

    >>> Preprocessing(crop_size=224, resize_size=256).with_resolution(112)
    Preprocessing(crop_size=112, resize_size=128, interpolation='bicubic', mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), crop='center')
    """

    crop_size: int
    resize_size: int
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    crop: str | float = "center"

    def __post_init__(self):
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation={self.interpolation!r}; use one of {INTERPOLATIONS}")
        if not (0 < self.crop_size <= self.resize_size):
            raise ValueError(f"need 0 < crop_size <= resize_size, got {self.crop_size}, {self.resize_size}")
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        object.__setattr__(self, "crop", check_crop(self.crop))

    def with_resolution(self, resolution: int) -> "Preprocessing":
        """The same recipe at another crop size, keeping the resize/crop ratio."""
        resize = int(round(resolution * self.resize_size / self.crop_size))
        return replace(self, crop_size=int(resolution), resize_size=max(resize, int(resolution)))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    @classmethod
    def from_torchvision(cls, weights) -> "Preprocessing":
        """Read a torchvision weights enum entry's eval transform."""
        t = weights.transforms()
        return cls(
            crop_size=int(t.crop_size[0]),
            resize_size=int(t.resize_size[0]),
            interpolation=t.interpolation.value,
            mean=tuple(t.mean),
            std=tuple(t.std),
        )


def tf_preprocessing(resolution: int, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> Preprocessing:
    """The TF reference eval transform (EfficientNet and EfficientNet-Lite): resize the shorter side
    to ``resolution + 32`` (bicubic), centre-crop ``resolution``, normalise with ``mean`` / ``std``.

    >>> p = tf_preprocessing(240, LITE_MEAN, LITE_STD)
    >>> p.crop_size, p.resize_size, p.interpolation
    (240, 272, 'bicubic')
    """
    return Preprocessing(int(resolution), int(resolution) + _TF_CROP_PADDING, "bicubic", mean, std)


def default_preprocessing(scaling: Scaling) -> Preprocessing:
    """Preprocessing of a config that no published weights describe (an unpublished phi, a variant
    without weights): crop = resolution. Lite follows its family's TF recipe and ``(x - 127) / 128``;
    everything else torchvision's 0.875 crop fraction, bicubic, ImageNet mean/std.

    Published variants take their weights' recipe instead: see
    :func:`effsk.weights.registry.variant_preprocessing`.

    >>> from effsk.scaling import resolve
    >>> default_preprocessing(resolve(0.5))
    Preprocessing(crop_size=232, resize_size=265, interpolation='bicubic', mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), crop='center')
    """
    if scaling.lite:
        return tf_preprocessing(scaling.resolution, LITE_MEAN, LITE_STD)
    return Preprocessing(scaling.resolution, int(round(scaling.resolution / _CROP_FRACTION)))
