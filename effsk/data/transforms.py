"""Model-input transforms: decoded RGB uint8 ``(3, H, W)`` -> normalised float32 ``(3, crop, crop)``.

:func:`eval_transform` is the deterministic recipe that travels with the weights; :func:`train_transform`
adds augmentation. Train presets, all torchvision.transforms.v2:

- ``"none"``: the model's eval transform (its ``crop`` policy), nothing random.
- ``"light"``: random resized crop (scale 0.5-1) and horizontal flip.
- ``"randaugment"``: random resized crop (scale 0.08-1), flip, RandAugment (2 ops, magnitude 9).
- ``"autoaugment"``: random resized crop (scale 0.08-1), flip, AutoAugment's ImageNet policy (the paper's).

The random resized crops sample the whole image whatever the ``crop`` policy, so every policy trains
on the same views; the policy decides what one deterministic view of an image is.

Randomness comes from torch's global generator (each DataLoader worker's own when ``num_workers > 0``).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Callable, Sequence

import torch
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as F

__all__ = ["AUGMENT_PRESETS", "EvalTransform", "eval_transform", "train_transform", "PadToSquare", "ByShorterSide"]

AUGMENT_PRESETS = ("none", "light", "randaugment", "autoaugment")


class PadToSquare(v2.Transform):
    """Pad an image of at most ``size`` x ``size`` to exactly that, centred, with ``fill`` (one value
    per channel); odd padding puts the extra pixel right/bottom, as :func:`F.center_crop` does."""

    def __init__(self, size: int, fill):
        super().__init__()
        self.size, self.fill = int(size), list(fill)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = F.get_size(flat_inputs[0])
        dx, dy = self.size - width, self.size - height
        return {"padding": [dx // 2, dy // 2, dx - dx // 2, dy - dy // 2]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return F.pad(inpt, params["padding"], fill=self.fill)


class ByShorterSide(v2.Transform):
    """``small`` for an image whose shorter side is below ``min_side``, ``large`` otherwise."""

    def __init__(self, min_side: int, small: Callable, large: Callable):
        super().__init__()
        self.min_side, self.small, self.large = int(min_side), small, large

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        return {"small": min(F.get_size(flat_inputs[0])) < self.min_side}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return (self.small if params["small"] else self.large)(inpt)


# The policy "auto" uses for images the centre recipe would upscale: of the policies that keep the whole
# image, squash scored best on small non-square photo crops (benchmarks/crop_policy.py; letterbox spends
# pixels on padding).
AUTO_SMALL_IMAGE_POLICY = "squash"


def _geometry(preprocessing) -> v2.Transform:
    """The resize/crop step of ``preprocessing``'s ``crop`` policy (uint8 in, uint8 out)."""
    crop, size = preprocessing.crop, preprocessing.crop_size
    interpolation = InterpolationMode(preprocessing.interpolation)
    if crop == "auto":
        return ByShorterSide(
            preprocessing.resize_size,
            small=_geometry(replace(preprocessing, crop=AUTO_SMALL_IMAGE_POLICY)),
            large=_geometry(replace(preprocessing, crop="center")),
        )
    if crop == "squash":
        return v2.Resize((size, size), interpolation=interpolation, antialias=True)
    if crop == "letterbox":
        # the mean colour, so that the padding is zero after normalisation (timm's crop_mode="border")
        fill = [round(255 * m) for m in preprocessing.mean]
        return v2.Compose(
            [v2.Resize(None, max_size=size, interpolation=interpolation, antialias=True), PadToSquare(size, fill)]
        )
    resize = preprocessing.resize_size if crop == "center" else math.floor(size / crop)  # timm's crop_pct
    return v2.Compose(
        [v2.Resize(resize, interpolation=interpolation, antialias=True), v2.CenterCrop(size)]
    )


class EvalTransform:
    """The eval recipe of ``preprocessing``, image by image or a batch at once.

    The resize/crop step of ``preprocessing.crop`` (see :class:`~effsk.data.preprocessing.Preprocessing`;
    ``"center"`` is torchvision's ImageClassification eval recipe: resize the shorter side to
    ``resize_size``, antialiased, centre-crop ``crop_size``), then scale to [0, 1] and normalise with
    ``mean`` / ``std``. Calling it transforms one RGB uint8 ``(3, H, W)`` tensor (or an ``(N, 3, H, W)``
    batch of one size); :meth:`batch`
    transforms a list of them with the same operations applied to stacked tensors (one resize per
    image size), which gives the same values several times faster for small images.
    """

    def __init__(self, preprocessing):
        self.preprocessing = preprocessing
        self.geometry = _geometry(preprocessing)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if image.ndim == 4:  # an (N, 3, H, W) batch of one size
            return self.batch(list(image))
        return self.batch([image])[0]

    def batch(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        """RGB uint8 ``(3, H, W)`` tensors (any sizes, one device) -> float32 ``(N, 3, crop, crop)``."""
        if not len(images):
            raise ValueError("no images to preprocess")
        pre = self.preprocessing
        crop = pre.crop_size
        out = torch.empty((len(images), 3, crop, crop), dtype=images[0].dtype, device=images[0].device)
        by_size: dict[tuple[int, int], list[int]] = {}
        for k, image in enumerate(images):
            by_size.setdefault(tuple(image.shape[-2:]), []).append(k)
        for positions in by_size.values():
            out[positions] = self.geometry(torch.stack([images[k] for k in positions]))
        batch = F.to_dtype(out, torch.float32, scale=True)
        return F.normalize(batch, mean=list(pre.mean), std=list(pre.std))


def eval_transform(preprocessing) -> EvalTransform:
    """RGB uint8 ``(3, H, W)`` -> float32 ``(3, crop, crop)``: the eval recipe of ``preprocessing``
    (see :class:`EvalTransform`, which also transforms batches).

    >>> from effsk.data.preprocessing import Preprocessing
    >>> image = torch.zeros(3, 40, 60, dtype=torch.uint8)
    >>> t = eval_transform(Preprocessing(crop_size=32, resize_size=36))
    >>> t(image).shape
    torch.Size([3, 32, 32])
    >>> t.batch([image, torch.zeros(3, 50, 50, dtype=torch.uint8)]).shape
    torch.Size([2, 3, 32, 32])
    >>> letterboxed = eval_transform(Preprocessing(crop_size=32, resize_size=36, crop="letterbox"))(image)
    >>> bool(letterboxed[:, :5].abs().max() < 0.01), bool((letterboxed[:, 5:26] < -1.5).all())  # 32x21 in the middle
    (True, True)
    """
    return EvalTransform(preprocessing)


def train_transform(preprocessing, augment: str = "light") -> Callable[[torch.Tensor], torch.Tensor]:
    """The training transform for ``preprocessing`` (a :class:`~effsk.data.preprocessing.Preprocessing`);
    ``"none"`` gives the :class:`EvalTransform`, which transforms batches too.

    >>> from effsk.data.preprocessing import Preprocessing
    >>> t = train_transform(Preprocessing(crop_size=32, resize_size=36), "randaugment")
    >>> out = t(torch.zeros(3, 50, 40, dtype=torch.uint8))
    >>> out.shape, out.dtype
    (torch.Size([3, 32, 32]), torch.float32)
    """
    if augment not in AUGMENT_PRESETS:
        raise ValueError(f"augment={augment!r}; use one of {AUGMENT_PRESETS}")
    if augment == "none":
        return eval_transform(preprocessing)
    interpolation = InterpolationMode(preprocessing.interpolation)
    scale = (0.5, 1.0) if augment == "light" else (0.08, 1.0)
    steps = [
        v2.RandomResizedCrop(preprocessing.crop_size, scale=scale, interpolation=interpolation, antialias=True),
        v2.RandomHorizontalFlip(),
    ]
    if augment == "randaugment":
        steps.append(v2.RandAugment(num_ops=2, magnitude=9, interpolation=InterpolationMode.BILINEAR))
    elif augment == "autoaugment":
        steps.append(v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET, interpolation=InterpolationMode.BILINEAR))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(preprocessing.mean, preprocessing.std)]
    return v2.Compose(steps)
