"""Every input type -> RGB uint8 ``(3, H, W)`` tensors; decoding errors; resize/crop/normalise per model.

One decoding path serves every estimator. ``X`` may be a sequence (list, tuple, numpy object array,
pandas Series, one-column DataFrame) of file paths, encoded image bytes, PIL images, ``HxW`` / ``HxWxC``
arrays or ``CxHxW`` tensors; an ``(N, H, W)`` / ``(N, H, W, C)`` uint8, uint16 or float array; or an
``(N, C, H, W)`` tensor. Float pixels lie in [0, 1]; uint16 pixels are 16-bit. Items are decoded one at
a time, inside DataLoader workers when there are any, so featurizing N files holds about one batch of
images in memory.

JPEG and PNG go through :mod:`torchvision.io` (libjpeg-turbo / libpng: the fastest decoders here); every
other format through PIL. Both paths honour EXIF orientation, convert grayscale, palette, 16-bit and
CMYK to RGB identically, drop alpha (as PIL's ``convert("RGB")`` does), take the first frame of
animations, and refuse images above ``PIL.Image.MAX_IMAGE_PIXELS`` (decompression bombs).
"""

from __future__ import annotations

import hashlib
import io
import math
import numbers
import os
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

try:
    from torchvision.io import ImageReadMode, decode_image
except ImportError:  # torchvision.io's decoders are deprecated since 0.29 (TorchCodec); PIL then decodes all
    decode_image = None
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as F

from .preprocessing import Preprocessing
from .transforms import eval_transform

__all__ = [
    "ImageLoadError",
    "ImageLoadWarning",
    "num_images",
    "load_image",
    "item_digest",
    "eval_transform",
    "ImageDataset",
    "ImageLoader",
    "make_loader",
]

ON_ERROR = ("raise", "nan")
# Formats torchvision.io decodes natively (and as one frame); everything else goes through PIL.
_TORCHVISION_FORMATS = ("JPEG", "PNG")
_CHANNELS = (1, 3, 4)
# Decoded images up to this many pixels wait for the rest of their batch to be transformed together;
# larger ones are transformed as they come, so a batch of photos never sits in memory at full size.
_BATCHED_PIXELS = 1 << 20


class ImageLoadError(ValueError):
    """An image could not be loaded. The message names the index, the path when there is one, and the reason.

    Attributes
    ----------
    index : int or None
        Position of the item in ``X``.
    path : str or None
        The file, when the item is a path.
    reason : str or None
        What went wrong.
    """

    def __init__(self, message: str, *, index: int | None = None, path: str | None = None, reason: str | None = None):
        # One positional argument only, so that the type survives DataLoader's worker re-raising.
        super().__init__(message)
        self.index, self.path, self.reason = index, path, reason

    @classmethod
    def for_item(cls, index: int | None, path: str | None, reason: str) -> ImageLoadError:
        where = "image" if index is None else f"image {index}"
        if path is not None:
            where += f" ({path!r})"
        return cls(f"{where}: {reason}", index=index, path=path, reason=reason)


class ImageLoadWarning(UserWarning):
    """Some images failed to load and got NaN feature rows (``on_error="nan"``)."""


class _BadImage(Exception):
    """Internal: the reason an item failed; :func:`load_image` adds index and path."""


# --------------------------------------------------------------------------------------------------
# The container
# --------------------------------------------------------------------------------------------------

def _items(X):
    """An indexable view of ``X`` whose entries are single images (nothing is decoded or copied)."""
    import pandas as pd

    if isinstance(X, (str, bytes, bytearray, os.PathLike, Image.Image)):
        raise TypeError(
            f"X must be a collection of images, got a single {type(X).__name__}; wrap it in a list: [x]."
        )
    if isinstance(X, pd.DataFrame):
        if X.shape[1] != 1:
            raise ValueError(
                f"X is a DataFrame with {X.shape[1]} columns {list(X.columns)!r}; images need exactly one "
                "column (select it, or use a ColumnTransformer to route the image column)."
            )
        return X.iloc[:, 0].to_numpy(dtype=object)
    if isinstance(X, pd.Series):
        return X.to_numpy(dtype=object)
    if isinstance(X, torch.Tensor):
        if X.ndim != 4 or X.shape[1] not in _CHANNELS:
            raise ValueError(
                f"X is a tensor of shape {tuple(X.shape)}; a batch of images must be (N, C, H, W) with C in 1, 3, 4."
            )
        return X
    if isinstance(X, np.ndarray):
        if X.dtype.kind == "S":
            raise TypeError(
                "X is a fixed-width bytes array, which drops trailing zero bytes of encoded images; "
                "pass a list or an object array of bytes."
            )
        if X.dtype == object or X.dtype.kind == "U":  # objects, or an array of path strings
            if X.ndim == 2 and X.shape[1] == 1:
                return X[:, 0]
            if X.ndim != 1:
                raise ValueError(f"X is an object array of shape {X.shape}; expected one image per row (1-D).")
            return X
        if X.ndim == 3 or (X.ndim == 4 and X.shape[-1] in _CHANNELS):
            return X
        if X.ndim == 4:
            raise ValueError(
                f"X is an array of shape {X.shape}; a batch of images must be (N, H, W, C) with C in 1, 3, 4 "
                "(channels last; use a torch tensor for (N, C, H, W))."
            )
        raise ValueError(
            f"X is a {X.ndim}-D numeric array of shape {X.shape}; images must be an (N, H, W) or (N, H, W, C) "
            "array or a sequence of images (file paths, bytes, PIL images, arrays). Tabular features "
            "belong in another ColumnTransformer column."
        )
    if isinstance(X, Sequence):
        return X
    raise TypeError(
        f"X of type {type(X).__name__} is not supported; pass a list, array, pandas Series or one-column "
        "DataFrame of images, an (N, H, W, C) array or an (N, C, H, W) tensor."
    )


def num_images(X) -> int:
    """Validate the container ``X`` and return how many images it holds.

    >>> num_images(["a.jpg", "b.png"])
    2
    >>> num_images(np.zeros((4, 8, 8, 3), dtype=np.uint8))
    4
    >>> num_images([])
    Traceback (most recent call last):
    ...
    ValueError: X is empty: expected at least one image.
    """
    n = len(_items(X))
    if n == 0:
        raise ValueError("X is empty: expected at least one image.")
    return n


def _path_of(item) -> str | None:
    return os.fspath(item) if isinstance(item, (str, os.PathLike)) else None


# --------------------------------------------------------------------------------------------------
# Decoding one item
# --------------------------------------------------------------------------------------------------

def load_image(item, index: int | None = None) -> torch.Tensor:
    """Decode one item of ``X`` to an RGB uint8 ``(3, H, W)`` tensor.

    Raises :class:`ImageLoadError` naming ``index``, the path and the reason when it cannot.

    >>> load_image(np.zeros((5, 7), dtype=np.uint8)).shape
    torch.Size([3, 5, 7])
    >>> load_image("missing.jpg", index=3)
    Traceback (most recent call last):
    ...
    effsk.data.images.ImageLoadError: image 3 ('missing.jpg'): file not found
    """
    path = _path_of(item)
    try:
        if path is not None:
            return _decode_encoded(_read_file(path))
        if isinstance(item, (bytes, bytearray, memoryview)):
            return _decode_encoded(bytes(item))
        if isinstance(item, Image.Image):
            return _from_pil(item)
        if isinstance(item, (np.ndarray, torch.Tensor)):
            return _from_array(item)
        if item is None or (isinstance(item, numbers.Real) and math.isnan(item)):
            raise _BadImage("missing value (None/NaN) instead of an image")
        raise _BadImage(
            f"unsupported item of type {type(item).__name__}; expected a file path, encoded image bytes, "
            "a PIL image, an array or a tensor"
        )
    except _BadImage as exc:
        raise ImageLoadError.for_item(index, path, str(exc)) from None


def _read_file(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise _BadImage("file not found") from None
    except IsADirectoryError:
        raise _BadImage("is a directory, not an image file") from None
    except OSError as exc:
        raise _BadImage(f"cannot read file: {exc.strerror or exc}") from None
    if not data:
        raise _BadImage("file is empty (0 bytes)")
    return data


def _check_pixel_limit(width: int, height: int) -> None:
    limit = Image.MAX_IMAGE_PIXELS
    if limit and width * height > limit:
        raise _BadImage(
            f"decompression bomb: {width}x{height} = {width * height} pixels exceeds "
            f"PIL.Image.MAX_IMAGE_PIXELS = {limit} (raise that limit if you trust the file)"
        )


def _decode_encoded(data: bytes) -> torch.Tensor:
    if not data:
        raise _BadImage("empty bytes")
    with warnings.catch_warnings():
        # Our own pixel limit below gives the error; PIL would only warn between 1x and 2x the limit.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        # torchvision 0.29 deprecates its decoders in favour of TorchCodec; they are still the fastest here.
        warnings.filterwarnings("ignore", "The image decoding and encoding capabilities", DeprecationWarning)
        try:
            image = Image.open(io.BytesIO(data))  # lazy: reads the header only
        except Image.DecompressionBombError as exc:
            raise _BadImage(f"decompression bomb: {exc}") from None
        except UnidentifiedImageError:
            raise _BadImage("not an image (unrecognised format)") from None
        except (OSError, ValueError, SyntaxError, EOFError) as exc:
            raise _BadImage(f"cannot read image header: {exc}") from None
        _check_pixel_limit(*image.size)
        if decode_image is not None and image.format in _TORCHVISION_FORMATS:
            try:
                decoded = decode_image(
                    torch.frombuffer(bytearray(data), dtype=torch.uint8),
                    mode=ImageReadMode.RGB,
                    apply_exif_orientation=True,
                )
                return _to_uint8(decoded)
            except RuntimeError:
                pass  # PIL below decodes what libjpeg/libpng reject leniently, or gives a readable reason
    return _from_pil(image)


def _to_uint8(image: torch.Tensor) -> torch.Tensor:
    return image if image.dtype == torch.uint8 else F.to_dtype(image, torch.uint8, scale=True)


def _from_pil(image: Image.Image) -> torch.Tensor:
    _check_pixel_limit(*image.size)
    try:
        image.load()
        image = ImageOps.exif_transpose(image)
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as exc:
        raise _BadImage(f"cannot decode image: {exc}") from None
    if image.mode.startswith("I;16") or image.mode == "I":
        # PIL's convert("RGB") clips 16-bit values at 255; rescale like torchvision does instead.
        pixels = np.asarray(image).astype(np.int64).clip(0, 65535).astype(np.uint16)
        return _from_array(pixels)
    if image.mode == "F":
        return _from_array(np.asarray(image))
    with warnings.catch_warnings():
        # "Palette images with transparency ... should be converted to RGBA": dropping alpha is intended.
        warnings.simplefilter("ignore", UserWarning)
        rgb = image.convert("RGB")
    return F.pil_to_tensor(rgb)


def _from_array(array) -> torch.Tensor:
    """numpy ``(H, W)`` / ``(H, W, C)`` or torch ``(H, W)`` / ``(C, H, W)`` -> RGB uint8 ``(3, H, W)``."""
    if isinstance(array, np.ndarray):
        if array.dtype.kind not in "uif":
            raise _BadImage(f"array of dtype {array.dtype} is not an image; expected uint8, uint16 or float pixels")
        if array.dtype.kind in "ui" and array.dtype not in (np.uint8, np.uint16):
            array = array.astype(np.int64)  # torch lacks arithmetic on uint32/uint64
        if array.ndim == 3:
            array = np.moveaxis(array, -1, 0)  # to channels first
        if not array.flags.writeable or any(stride < 0 for stride in array.strides):
            array = array.copy()
        tensor = torch.from_numpy(array)
        layout = "(H, W) or (H, W, C)"
    else:
        tensor, layout = array.detach().cpu(), "(H, W) or (C, H, W)"
    if tensor.ndim == 2:
        tensor = tensor.unsqueeze(0)
    if tensor.ndim != 3:
        raise _BadImage(f"array of shape {tuple(array.shape)} is not an image: expected {layout}")
    channels, height, width = tensor.shape
    if channels not in _CHANNELS:
        raise _BadImage(
            f"array of shape {tuple(array.shape)} has {channels} channels; expected 1 (grayscale), 3 (RGB) or 4 (RGBA)"
        )
    if height == 0 or width == 0:
        raise _BadImage(f"array of shape {tuple(array.shape)} has no pixels")
    tensor = _pixels_to_uint8(tensor)
    if channels == 1:
        tensor = tensor.expand(3, -1, -1)
    return tensor[:3].contiguous()


def _pixels_to_uint8(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.dtype == torch.uint8:
        return tensor
    if tensor.dtype == torch.bool or tensor.is_complex():
        dtype = str(tensor.dtype).removeprefix("torch.")
        raise _BadImage(f"array of dtype {dtype} is not an image; expected uint8, uint16 or float pixels")
    if tensor.is_floating_point():
        if torch.isnan(tensor).any():
            raise _BadImage("array contains NaN")
        if torch.isinf(tensor).any():
            raise _BadImage("array contains infinite values")
        low, high = tensor.min().item(), tensor.max().item()
        if low < 0 or high > 1:
            raise _BadImage(
                f"float pixels must lie in [0, 1], got values in [{low:g}, {high:g}] "
                "(divide 0-255 images by 255, or pass uint8)"
            )
        return F.to_dtype(tensor.float(), torch.uint8, scale=True)
    if tensor.dtype == torch.uint16:
        return F.to_dtype(tensor, torch.uint8, scale=True)
    low, high = tensor.min().item(), tensor.max().item()
    if low < 0 or high > 255:
        raise _BadImage(
            f"integer pixels of dtype {str(tensor.dtype).removeprefix('torch.')} must lie in [0, 255], "
            f"got values in [{low}, {high}] (use uint16 for 16-bit images)"
        )
    return tensor.to(torch.uint8)


def item_digest(item) -> str | None:
    """Content hash of one item: of the encoded bytes for paths and bytes, of the decoded pixels otherwise.

    ``None`` when the item cannot be read (the decoding pass reports why).
    """
    digest = hashlib.blake2b(digest_size=20)
    path = _path_of(item)
    try:
        if path is not None:
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
        elif isinstance(item, (bytes, bytearray, memoryview)):
            digest.update(item)
        else:
            pixels = load_image(item)
            digest.update(b"pixels%r" % (tuple(pixels.shape),))
            digest.update(pixels.numpy().tobytes())
    except (OSError, ImageLoadError):
        return None
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------
# Model input
# --------------------------------------------------------------------------------------------------

class ImageDataset(Dataset):
    """Streams ``X``: entry ``p`` -> ``(transform(image), index, error)``, decoding on access.

    ``index`` is the position in ``X`` (``indices[p]`` when a subset is given). A failing item gives
    ``error = (index, path, reason)`` and an all-NaN image of the transform's output shape, so that one
    bad file never stops a batch; :class:`ImageLoader` decides whether to raise. A transform with a
    ``batch`` method (:class:`~effsk.data.transforms.EvalTransform`) transforms the images of a batch
    together (:meth:`__getitems__`, which DataLoaders call).
    """

    def __init__(self, X, transform: Callable, *, indices=None, placeholder_size: int = 32):
        self._items = _items(X)
        self._indices = None if indices is None else np.asarray(indices, dtype=np.int64)
        self.transform = transform
        self._placeholder_size = placeholder_size
        self._placeholder = None

    def __len__(self) -> int:
        return len(self._items) if self._indices is None else len(self._indices)

    def _load(self, position: int):
        """``(decoded image or None, index, error or None)`` of entry ``position``."""
        index = int(position if self._indices is None else self._indices[position])
        try:
            return load_image(self._items[index], index), index, None
        except ImageLoadError as exc:
            return None, index, (index, exc.path, exc.reason)

    def __getitem__(self, position: int):
        image, index, error = self._load(position)
        return (self._failed() if image is None else self.transform(image)), index, error

    def __getitems__(self, positions):
        """The entries at ``positions``; small images go through a batch-capable transform together."""
        transform_batch = getattr(self.transform, "batch", None)
        if transform_batch is None:
            return [self[p] for p in positions]
        samples, pending = [], []
        for position in positions:
            image, index, error = self._load(position)
            if image is not None and image.shape[-2] * image.shape[-1] <= _BATCHED_PIXELS:
                pending.append(len(samples))  # transformed below, with the others of its batch
            elif image is not None:
                image = self.transform(image)  # a large decoded image is not kept waiting for the batch
            samples.append([self._failed() if image is None else image, index, error])
        if pending:
            for k, image in zip(pending, transform_batch([samples[k][0] for k in pending])):
                samples[k][0] = image
        return [tuple(sample) for sample in samples]

    def _failed(self) -> torch.Tensor:
        if self._placeholder is None:
            size = self._placeholder_size
            shape = self.transform(torch.zeros(3, size, size, dtype=torch.uint8)).shape
            self._placeholder = torch.full(shape, float("nan"))
        return self._placeholder.clone()


def _collate(samples):
    images, indices, errors = zip(*samples)
    return torch.stack(images), torch.tensor(indices, dtype=torch.int64), [e for e in errors if e is not None]


class ImageLoader(DataLoader):
    """A DataLoader over an :class:`ImageDataset` yielding ``(images, batch_targets)``.

    Load failures travel with the batch and are raised (``on_error="raise"``) here, in the main
    process, with a clean message; ``return_errors=True`` yields ``(images, batch_targets, errors)``
    with ``errors`` a list of ``(index, path, reason)``.
    """

    def __init__(self, dataset: ImageDataset, *, targets=None, on_error="raise", return_errors=False, **kwargs):
        super().__init__(dataset, collate_fn=_collate, **kwargs)
        self.targets = targets
        self.on_error = on_error
        self.return_errors = return_errors

    def __iter__(self):
        for images, indices, errors in super().__iter__():
            if errors and self.on_error == "raise":
                raise ImageLoadError.for_item(*errors[0])
            batch_targets = indices if self.targets is None else self.targets[indices]
            yield (images, batch_targets, errors) if self.return_errors else (images, batch_targets)


def _as_target_tensor(targets, n: int) -> torch.Tensor:
    # np.array copies: pandas hands out read-only views, which torch refuses to wrap silently.
    tensor = targets if isinstance(targets, torch.Tensor) else torch.from_numpy(np.array(targets))
    if len(tensor) != n:
        raise ValueError(f"targets has {len(tensor)} rows but X has {n} images.")
    return tensor


def make_loader(
    X,
    preprocessing: Preprocessing,
    *,
    transform: Callable | None = None,
    targets=None,
    batch_size: int = 32,
    shuffle: bool = False,
    num_workers: int = 0,
    pin_memory: bool = False,
    generator: torch.Generator | None = None,
    on_error: str = "raise",
    drop_last: bool = False,
    indices=None,
    return_errors: bool = False,
    sampler=None,
) -> ImageLoader:
    """A streaming DataLoader over ``X`` yielding ``(images, batch_targets)``.

    Parameters
    ----------
    X : images
        Any input accepted by :func:`num_images`.
    preprocessing : Preprocessing
        The model's preprocessing; gives the default transform.
    transform : callable, optional
        Receives each decoded RGB uint8 ``(3, H, W)`` tensor; defaults to :func:`eval_transform`.
    targets : array-like or tensor, optional
        One row per image; batches carry the rows of their items. When ``None`` they carry the
        int64 item indices instead.
    batch_size, shuffle, num_workers, pin_memory, generator, drop_last
        As in :class:`torch.utils.data.DataLoader`; decoding runs in the workers.
    on_error : {"raise", "nan"}
        ``"raise"``: a failing item raises :class:`ImageLoadError`. ``"nan"``: its image is all NaN.
    indices : array-like of int, optional
        Load only these items of ``X`` (batch indices still refer to positions in ``X``).
    return_errors : bool, default=False
        Yield ``(images, batch_targets, errors)``, ``errors`` listing ``(index, path, reason)``.
    sampler : torch.utils.data.Sampler, optional
        Picks the items instead of ``shuffle`` (e.g. a DistributedSampler over the dataset).

    Examples
    --------
    >>> X = np.zeros((5, 40, 40, 3), dtype=np.uint8)
    >>> loader = make_loader(X, Preprocessing(32, 36), batch_size=4)
    >>> [(tuple(images.shape), idx.tolist()) for images, idx in loader]
    [((4, 3, 32, 32), [0, 1, 2, 3]), ((1, 3, 32, 32), [4])]
    """
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error={on_error!r}; use one of {ON_ERROR}")
    if sampler is not None and shuffle:
        raise ValueError("pass either shuffle=True or a sampler, not both")
    n = num_images(X)
    if targets is not None:
        targets = _as_target_tensor(targets, n)
    dataset = ImageDataset(
        X,
        eval_transform(preprocessing) if transform is None else transform,
        indices=indices,
        placeholder_size=preprocessing.crop_size,
    )
    return ImageLoader(
        dataset,
        targets=targets,
        on_error=on_error,
        return_errors=return_errors,
        batch_size=batch_size,
        shuffle=shuffle,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        generator=generator,
        drop_last=drop_last,
    )
