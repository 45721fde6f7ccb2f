"""Every input type -> uint8 image tensors -> batches of model input.

Minimal implementation of the images contract used by the estimators and the training loop
(``num_images``, ``eval_transform``, ``make_loader``, ``ImageLoadError``); the full version with
streaming paths, tables and ``on_error`` policies lives on the input-layer branch.
"""

from __future__ import annotations

import io
import os
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as TF

__all__ = ["ImageLoadError", "num_images", "eval_transform", "make_loader"]


class ImageLoadError(ValueError):
    """An input item could not be turned into an RGB image. ``index`` is its position in ``X``."""

    def __init__(self, message: str, index: int | None = None):
        super().__init__(message)
        self.index = index


def _is_batch_array(X) -> bool:
    return (isinstance(X, np.ndarray) and X.ndim in (3, 4) and X.dtype != object) or (
        isinstance(X, torch.Tensor) and X.ndim == 4
    )


def _as_sequence(X):
    if hasattr(X, "iloc"):  # pandas Series / one-column DataFrame
        if getattr(X, "ndim", 1) == 2:
            if X.shape[1] != 1:
                raise ValueError(f"a DataFrame of images must have one column, got {X.shape[1]}")
            X = X.iloc[:, 0]
        return X.tolist()
    if isinstance(X, (list, tuple)) or (isinstance(X, np.ndarray) and X.ndim == 1):
        return X
    raise ValueError(
        f"cannot read images from {type(X).__name__}; pass a sequence of paths, bytes, PIL images or "
        "arrays, an (N,H,W,C) / (N,H,W) array or an (N,C,H,W) tensor"
    )


def num_images(X) -> int:
    """Number of images in ``X``."""
    if _is_batch_array(X):
        return int(X.shape[0])
    return len(_as_sequence(X))


def _array_to_uint8_chw(a: np.ndarray) -> torch.Tensor:
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4):
        raise ValueError(f"expected an HxW or HxWxC array with C in 1, 3, 4, got shape {a.shape}")
    t = torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1)
    return _tensor_to_uint8_rgb(t)


def _tensor_to_uint8_rgb(t: torch.Tensor) -> torch.Tensor:
    if t.dtype == torch.uint16 or t.dtype == torch.int32:
        t = (t.to(torch.int64) >> 8).to(torch.uint8)
    elif t.dtype != torch.uint8:
        if not t.is_floating_point():
            raise ValueError(f"unsupported dtype {t.dtype}")
        if not torch.isfinite(t).all():
            raise ValueError("image contains NaN or infinite values")
        t = TF.to_dtype(t.clamp(0, 1), torch.uint8, scale=True)
    if t.shape[0] == 1:
        t = t.expand(3, -1, -1)
    elif t.shape[0] == 4:
        t = t[:3]
    elif t.shape[0] != 3:
        raise ValueError(f"expected 1, 3 or 4 channels, got {t.shape[0]}")
    return t.contiguous()


def _decode(item) -> torch.Tensor:
    if isinstance(item, (str, os.PathLike)):
        with Image.open(item) as im:
            return TF.pil_to_tensor(im.convert("RGB"))
    if isinstance(item, (bytes, bytearray, memoryview)):
        with Image.open(io.BytesIO(bytes(item))) as im:
            return TF.pil_to_tensor(im.convert("RGB"))
    if isinstance(item, Image.Image):
        return TF.pil_to_tensor(item.convert("RGB"))
    if isinstance(item, np.ndarray):
        return _array_to_uint8_chw(item)
    if isinstance(item, torch.Tensor) and item.ndim == 3:
        return _tensor_to_uint8_rgb(item)
    raise ValueError(f"unsupported item type {type(item).__name__}")


def _describe(item) -> str:
    if isinstance(item, (str, os.PathLike)):
        return f" ({os.fspath(item)!r})"
    return f" ({type(item).__name__})"


class _Images(Dataset):
    def __init__(self, X, transform: Callable, targets):
        self.batch = X if _is_batch_array(X) else None
        self.items = None if self.batch is not None else _as_sequence(X)
        self.transform = transform
        self.targets = None if targets is None else torch.as_tensor(np.asarray(targets))
        if self.targets is not None and len(self.targets) != len(self):
            raise ValueError(f"targets has {len(self.targets)} rows for {len(self)} images")

    def __len__(self) -> int:
        return len(self.batch) if self.batch is not None else len(self.items)

    def load(self, i: int) -> torch.Tensor:
        if self.batch is not None:
            if isinstance(self.batch, torch.Tensor):
                return _tensor_to_uint8_rgb(self.batch[i])
            return _array_to_uint8_chw(self.batch[i])
        item = self.items[i]
        try:
            return _decode(item)
        except Exception as exc:  # any decoder failure becomes one error type naming the item
            raise ImageLoadError(f"cannot load image {i}{_describe(item)}: {exc}", index=i) from exc

    def __getitem__(self, i: int):
        image = self.transform(self.load(i))
        target = torch.tensor(i, dtype=torch.int64) if self.targets is None else self.targets[i]
        return image, target


def eval_transform(preprocessing) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 (3,H,W) -> float32 (3,crop,crop): resize shorter side, centre crop, normalise."""
    return v2.Compose(
        [
            v2.Resize(preprocessing.resize_size, interpolation=InterpolationMode(preprocessing.interpolation), antialias=True),
            v2.CenterCrop(preprocessing.crop_size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(preprocessing.mean, preprocessing.std),
        ]
    )


def make_loader(
    X,
    preprocessing,
    *,
    transform=None,
    targets=None,
    batch_size: int = 32,
    shuffle: bool = False,
    num_workers: int = 0,
    pin_memory: bool = False,
    generator=None,
    on_error: str = "raise",
    drop_last: bool = False,
) -> DataLoader:
    """A DataLoader of ``(images float32 (B,3,crop,crop), batch_targets)``; ``batch_targets`` are rows
    of ``targets``, or the int64 positions of the items in ``X`` when ``targets`` is None."""
    if on_error != "raise":
        raise ValueError(f"on_error={on_error!r}; this build supports 'raise' only")
    dataset = _Images(X, transform or eval_transform(preprocessing), targets)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        pin_memory=pin_memory,
        generator=generator,
        drop_last=drop_last,
        persistent_workers=False,
    )
