"""Preprocessing configs: how raw images become model input. They travel with the weights.

Semantics are torchvision's ImageClassification eval transform: resize the shorter side to
``resize_size`` with ``interpolation``, centre-crop ``crop_size``, scale to [0, 1], normalise.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from ..scaling import Scaling

__all__ = ["Preprocessing", "IMAGENET_MEAN", "IMAGENET_STD", "LITE_MEAN", "LITE_STD", "default_preprocessing"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# TF Lite models take (x - 127) / 128 in pixel units, i.e. mean 127/255, std 128/255 on [0, 1].
LITE_MEAN = (127 / 255,) * 3
LITE_STD = (128 / 255,) * 3
INTERPOLATIONS = ("nearest", "bilinear", "bicubic")
# torchvision's ImageNet eval transforms for its EfficientNet weights: (resize, crop). REFERENCE.md.
_TORCHVISION_EVAL = {"b0": (256, 224), "b1": (256, 240), "b2": (288, 288), "b3": (320, 300),
                     "b4": (384, 380), "b5": (456, 456), "b6": (528, 528), "b7": (600, 600)}
_CROP_FRACTION = 0.875


@dataclass(frozen=True)
class Preprocessing:
    """Resize-shorter-side, centre-crop, normalise.

    >>> Preprocessing(crop_size=224, resize_size=256).with_resolution(112)
    Preprocessing(crop_size=112, resize_size=128, interpolation='bicubic', mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    """

    crop_size: int
    resize_size: int
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self):
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation={self.interpolation!r}; use one of {INTERPOLATIONS}")
        if not (0 < self.crop_size <= self.resize_size):
            raise ValueError(f"need 0 < crop_size <= resize_size, got {self.crop_size}, {self.resize_size}")
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))

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


def default_preprocessing(scaling: Scaling) -> Preprocessing:
    """Preprocessing for a freshly built model: torchvision's eval recipe for published b0..b7,
    the TF Lite normalisation for Lite, and crop = resolution with a 0.875 crop fraction otherwise."""
    if scaling.name in _TORCHVISION_EVAL:
        resize, crop = _TORCHVISION_EVAL[scaling.name]
        return Preprocessing(crop_size=crop, resize_size=resize)
    resize = int(round(scaling.resolution / _CROP_FRACTION))
    if scaling.lite:
        return Preprocessing(scaling.resolution, resize, "bilinear", LITE_MEAN, LITE_STD)
    return Preprocessing(scaling.resolution, resize)
