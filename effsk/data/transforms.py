"""Model-input transforms: decoded RGB uint8 ``(3, H, W)`` -> normalised float32 ``(3, crop, crop)``.

:func:`eval_transform` is the deterministic recipe that travels with the weights; :func:`train_transform`
adds augmentation. Train presets, all torchvision.transforms.v2:

- ``"none"``: the model's eval transform (resize shorter side, centre crop), nothing random.
- ``"light"``: random resized crop (scale 0.5-1) and horizontal flip.
- ``"randaugment"``: random resized crop (scale 0.08-1), flip, RandAugment (2 ops, magnitude 9).
- ``"autoaugment"``: random resized crop (scale 0.08-1), flip, AutoAugment's ImageNet policy (the paper's).

Randomness comes from torch's global generator (each DataLoader worker's own when ``num_workers > 0``).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as F

__all__ = ["AUGMENT_PRESETS", "EvalTransform", "eval_transform", "train_transform"]

AUGMENT_PRESETS = ("none", "light", "randaugment", "autoaugment")


class EvalTransform:
    """torchvision's ImageClassification eval recipe for ``preprocessing``, image by image or a batch at once.

    Resize the shorter side to ``resize_size`` (antialiased), centre-crop ``crop_size``, scale to [0, 1],
    normalise with ``mean`` / ``std``. Calling it transforms one RGB uint8 ``(3, H, W)`` tensor;
    :meth:`batch` transforms a list of them with the same operations applied to stacked tensors (one
    resize per image size), which gives the same values several times faster for small images.
    """

    def __init__(self, preprocessing):
        self.preprocessing = preprocessing
        self.interpolation = InterpolationMode(preprocessing.interpolation)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
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
            group = torch.stack([images[k] for k in positions])
            group = F.resize(group, [pre.resize_size], interpolation=self.interpolation, antialias=True)
            out[positions] = F.center_crop(group, [crop])
        batch = F.to_dtype(out, torch.float32, scale=True)
        return F.normalize(batch, mean=list(pre.mean), std=list(pre.std))


def eval_transform(preprocessing) -> EvalTransform:
    """RGB uint8 ``(3, H, W)`` -> float32 ``(3, crop, crop)``: torchvision's ImageClassification eval
    recipe (see :class:`EvalTransform`, which also transforms batches).

    >>> from effsk.data.preprocessing import Preprocessing
    >>> t = eval_transform(Preprocessing(crop_size=32, resize_size=36))
    >>> t(torch.zeros(3, 40, 60, dtype=torch.uint8)).shape
    torch.Size([3, 32, 32])
    >>> t.batch([torch.zeros(3, 40, 60, dtype=torch.uint8), torch.zeros(3, 50, 50, dtype=torch.uint8)]).shape
    torch.Size([2, 3, 32, 32])
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
