"""A GPU-fed input pipeline for inference: JPEG bytes decoded by nvJPEG, resized and normalised on the device.

The CPU pipeline (:func:`effsk.data.images.make_loader`) decodes and transforms every image in DataLoader
workers and ships float32 crops to the GPU. On a GPU machine that keeps the CPU busy while the GPU waits:
decoding and a bicubic antialiased resize cost several milliseconds per photo on one core. Here the
workers only read files and parse JPEG headers; the main process hands a whole batch of encoded JPEGs to
``torchvision.io.decode_jpeg(..., device="cuda")`` (nvJPEG's batched decoder) and applies the weights'
eval preprocessing (resize shorter side, centre crop, scale, normalise, as
:func:`effsk.data.transforms.eval_transform`) to the decoded batch on the device.

Everything the device decoder should not take is decoded on the CPU by :func:`effsk.data.images.load_image`
in the workers and then joins the same device-side preprocessing: non-JPEG files and bytes, arrays, PIL
images, CMYK JPEGs, JPEGs whose EXIF orientation is not the identity, images above PIL's pixel limit, and
any JPEG the device decoder rejects. On a device without nvJPEG (the CPU) the same code runs with
libjpeg-turbo, so it is tested everywhere.

:func:`resolve_num_workers` turns ``num_workers="auto"`` into a worker count that suits the machine, and
:func:`resolve_decode` ``decode="auto"`` into the decoder an estimator uses.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from .images import ON_ERROR, ImageLoadError, _items, load_image, num_images
from .preprocessing import Preprocessing
from .transforms import eval_transform

try:
    from torchvision.io import ImageReadMode, decode_jpeg
except ImportError:  # a torchvision without its image decoders (deprecated since 0.29): the CPU path decodes all
    decode_jpeg = None

__all__ = [
    "MAX_AUTO_WORKERS",
    "DECODERS",
    "resolve_num_workers",
    "resolve_decode",
    "device_decodable",
    "decode_on_device",
    "preprocess_on_device",
    "DeviceDecodeLoader",
    "make_device_loader",
]

#: Where the estimators' ``decode`` parameter decodes JPEGs: ``"auto"`` resolves to one of the others.
DECODERS = ("auto", "cpu", "device")
#: Upper bound of ``num_workers="auto"``: reading files and parsing headers is cheap, and each worker
#: costs a process and its memory.
MAX_AUTO_WORKERS = 8
_JPEG_MAGIC = b"\xff\xd8\xff"
_EXIF_ORIENTATION = 0x0112
# JPEG colour modes nvJPEG turns into RGB exactly as libjpeg does; CMYK/YCCK go through PIL's conversion.
_DEVICE_MODES = ("RGB", "L")


def _available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # what this process may use (containers, taskset), not the host's
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def resolve_num_workers(num_workers="auto", device="cpu", *, cores: int | None = None) -> int:
    """DataLoader workers for ``num_workers``: an int >= 0 is returned as is; ``"auto"`` scales with the machine.

    ``"auto"`` counts the cores this process may use (divided among ``LOCAL_WORLD_SIZE`` processes under
    torchrun) and gives 0 on two cores or fewer (a worker would only compete with the main process);
    otherwise, on an accelerator (``cuda``, ``mps``), one core per worker up to :data:`MAX_AUTO_WORKERS`,
    leaving one core to the main process that feeds the device; and on the CPU one worker, which overlaps
    decoding with the network while leaving the other cores to torch's threads (the network, not the
    decoder, is the bottleneck there: B0 costs about 10x a photo's decode per image and core).

    Parameters
    ----------
    num_workers : int or "auto"
    device : str or torch.device
        Where the network runs.
    cores : int, optional
        Cores to plan for (default: those this process may use).

    Examples
    --------
    >>> resolve_num_workers(3, "cuda")
    3
    >>> [resolve_num_workers("auto", "cuda", cores=c) for c in (1, 2, 4, 16, 64)]
    [0, 0, 3, 8, 8]
    >>> [resolve_num_workers("auto", "cpu", cores=c) for c in (2, 4, 64)]
    [0, 1, 1]
    """
    if num_workers != "auto":
        if isinstance(num_workers, bool) or not isinstance(num_workers, (int, np.integer)) or num_workers < 0:
            raise ValueError(f"num_workers={num_workers!r} is not valid; use an int >= 0 or 'auto'.")
        return int(num_workers)
    if cores is None:
        processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
        cores = _available_cores() // max(1, processes)
    if cores <= 2:
        return 0
    device_type = device.type if isinstance(device, torch.device) else torch.device(device).type
    if device_type in ("cuda", "mps"):
        return min(MAX_AUTO_WORKERS, cores - 1)
    return 1


def resolve_decode(decode="auto", device="cpu") -> str:
    """``"cpu"`` (decode and preprocess in DataLoader workers, :func:`effsk.data.images.make_loader`) or
    ``"device"`` (:func:`make_device_loader`) for ``decode``; ``"auto"`` is ``"device"`` on NVIDIA CUDA
    when torchvision's ``decode_jpeg`` is there (nvJPEG), else ``"cpu"``: on a CPU the device path would
    only move JPEG decoding from the workers into the main process, and ROCm has no nvJPEG (every JPEG
    would fall back to the CPU, one by one, in the main process).

    >>> resolve_decode("auto", "cpu"), resolve_decode("device", "cpu"), resolve_decode("cpu", "cuda")
    ('cpu', 'device', 'cpu')
    """
    if decode not in DECODERS:
        raise ValueError(f"decode={decode!r} is not valid; use one of {DECODERS}.")
    if decode != "auto":
        return decode
    device_type = device.type if isinstance(device, torch.device) else torch.device(device).type
    nvidia = device_type == "cuda" and getattr(torch.version, "hip", None) is None
    return "device" if nvidia and decode_jpeg is not None else "cpu"


# --------------------------------------------------------------------------------------------------
# Routing: which items the device decoder takes
# --------------------------------------------------------------------------------------------------

def device_decodable(data: bytes) -> bool:
    """Whether the device decoder should take these encoded bytes: a baseline or progressive JPEG in
    RGB/YCbCr or grayscale, with no EXIF rotation and within ``PIL.Image.MAX_IMAGE_PIXELS``.

    Reads the header only. Everything else is decoded on the CPU, which applies EXIF orientation,
    converts CMYK, and reports unreadable or oversized images by name.

    >>> buffer = io.BytesIO()
    >>> Image.new("RGB", (8, 8)).save(buffer, format="JPEG")
    >>> device_decodable(buffer.getvalue()), device_decodable(b"not an image")
    (True, False)
    """
    if not data.startswith(_JPEG_MAGIC):
        return False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:  # lazy: parses the header only
                width, height = image.size
                limit = Image.MAX_IMAGE_PIXELS
                return (
                    image.format == "JPEG"
                    and image.mode in _DEVICE_MODES
                    and not (limit and width * height > limit)
                    and image.getexif().get(_EXIF_ORIENTATION, 1) == 1
                )
    except Exception:  # noqa: BLE001 - any header PIL cannot parse: the CPU path says what is wrong
        return False


def _encoded_bytes(item) -> bytes | None:
    """The encoded bytes of a path or bytes item; ``None`` for other items and unreadable files."""
    if isinstance(item, (bytes, bytearray, memoryview)):
        return bytes(item)
    if isinstance(item, (str, os.PathLike)):
        try:
            with open(item, "rb") as f:
                return f.read()
        except OSError:
            return None  # load_image re-reads it and names the reason
    return None


class _EncodedOrDecoded(Dataset):
    """Entry ``p`` of ``X`` -> ``(kind, payload, index, error)``, run in DataLoader workers.

    ``kind`` is ``"jpeg"`` with the encoded bytes as a 1-D uint8 tensor for the device decoder,
    ``"pixels"`` with an RGB uint8 ``(3, H, W)`` tensor decoded here on the CPU, or ``"failed"`` with
    ``error = (index, path, reason)``.
    """

    def __init__(self, X, indices=None):
        self._items = _items(X)
        self._indices = None if indices is None else np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return len(self._items) if self._indices is None else len(self._indices)

    def __getitem__(self, position: int):
        index = int(position if self._indices is None else self._indices[position])
        item = self._items[index]
        data = _encoded_bytes(item)
        if data and decode_jpeg is not None and device_decodable(data):
            return "jpeg", torch.frombuffer(bytearray(data), dtype=torch.uint8), index, None
        return _decode_on_cpu(item, index)


def _decode_on_cpu(item, index: int):
    try:
        return "pixels", load_image(item, index), index, None
    except ImageLoadError as exc:
        return "failed", None, index, (index, exc.path, exc.reason)


def _collate(samples):
    kinds, payloads, indices, errors = zip(*samples)
    return list(kinds), list(payloads), torch.tensor(indices, dtype=torch.int64), [e for e in errors if e is not None]


# --------------------------------------------------------------------------------------------------
# Decoding and preprocessing on the device
# --------------------------------------------------------------------------------------------------

def _device_jpeg_decode(encoded, device: torch.device):
    if device.type == "cuda":
        # torchvision's CUDA decoder writes on a private stream into blocks the caching allocator may have
        # just recycled from kernels still queued on ours (pytorch/vision#9606, seen on H100): let ours drain.
        torch.cuda.current_stream(device).synchronize()
    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its decoders in favour of TorchCodec; they are what we have here.
        warnings.filterwarnings("ignore", "The image decoding and encoding capabilities", DeprecationWarning)
        warnings.filterwarnings("ignore", "The image decoding and encoding capabilities", UserWarning)
        return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)


def _rgb(image: torch.Tensor) -> torch.Tensor:
    return image.expand(3, -1, -1) if image.shape[0] == 1 else image[:3]


def decode_on_device(encoded: list[torch.Tensor], device, *, items=None, indices=None) -> list:
    """Decode encoded JPEGs (1-D uint8 CPU tensors) to RGB uint8 ``(3, H, W)`` tensors on ``device``.

    One batched call first (nvJPEG's batched decoder on CUDA). When it fails, each image is decoded
    alone, and an image the device decoder rejects is decoded on the CPU by
    :func:`~effsk.data.images.load_image` from ``items[k]`` (default: its bytes), which decodes what
    libjpeg accepts leniently and otherwise raises :class:`~effsk.data.images.ImageLoadError` naming
    ``indices[k]`` and the reason. Entries of the returned list are tensors, or that error.
    """
    device = torch.device(device)
    if not encoded:
        return []
    try:
        return [_rgb(image) for image in _device_jpeg_decode(encoded, device)]
    except RuntimeError:
        pass  # one bad image fails the whole batched call: find it
    decoded = []
    for k, data in enumerate(encoded):
        try:
            decoded.append(_rgb(_device_jpeg_decode(data, device)))
        except RuntimeError:
            item = data.numpy().tobytes() if items is None else items[k]
            index = None if indices is None else int(indices[k])
            try:
                decoded.append(load_image(item, index).to(device))
            except ImageLoadError as exc:
                decoded.append(exc)
    return decoded


def preprocess_on_device(images: list[torch.Tensor], preprocessing: Preprocessing) -> torch.Tensor:
    """RGB uint8 ``(3, H, W)`` tensors on one device -> float32 ``(N, 3, crop, crop)`` on that device,
    as :func:`~effsk.data.transforms.eval_transform` computes each (resize the shorter side with the
    weights' interpolation, antialiased; centre crop; scale to [0, 1]; normalise).

    Images of the same size are resized together, in one call (:meth:`~effsk.data.transforms.EvalTransform.batch`).

    >>> from effsk.data.preprocessing import Preprocessing
    >>> images = [torch.zeros(3, 40, 60, dtype=torch.uint8), torch.full((3, 50, 50), 255, dtype=torch.uint8)]
    >>> batch = preprocess_on_device(images, Preprocessing(crop_size=32, resize_size=36, mean=(0.5,) * 3, std=(0.5,) * 3))
    >>> tuple(batch.shape), batch[0].min().item(), batch[1].max().item()
    ((2, 3, 32, 32), -1.0, 1.0)
    """
    return eval_transform(preprocessing).batch(images)


# --------------------------------------------------------------------------------------------------
# The loader
# --------------------------------------------------------------------------------------------------

class DeviceDecodeLoader:
    """Batches of ``X`` preprocessed on ``device``: yields ``(images, indices)`` like
    :class:`~effsk.data.images.ImageLoader`, or ``(images, indices, errors)`` with ``return_errors=True``.

    ``images`` is float32 ``(B, 3, crop, crop)`` already on ``device``; ``indices`` the int64 positions
    in ``X`` (on the CPU); ``errors`` lists ``(index, path, reason)`` of the items that failed, whose
    rows are NaN. With ``on_error="raise"`` the first failure raises :class:`ImageLoadError` instead.
    """

    def __init__(self, loader: DataLoader, preprocessing: Preprocessing, device, *, on_error="raise", return_errors=False):
        self.loader = loader
        self.preprocessing = preprocessing
        self.device = torch.device(device)
        self.on_error = on_error
        self.return_errors = return_errors

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator:
        dataset = self.loader.dataset
        for kinds, payloads, indices, errors in self.loader:
            images, errors = self._to_device(kinds, payloads, indices, errors, dataset)
            if errors and self.on_error == "raise":
                raise ImageLoadError.for_item(*errors[0])
            yield (images, indices, errors) if self.return_errors else (images, indices)

    def _to_device(self, kinds, payloads, indices, errors, dataset):
        errors = list(errors)
        jpegs = [k for k, kind in enumerate(kinds) if kind == "jpeg"]
        decoded = decode_on_device(
            [payloads[k] for k in jpegs], self.device,
            items=[dataset._items[int(indices[k])] for k in jpegs], indices=[indices[k] for k in jpegs],
        )
        pixels: list = [None] * len(kinds)
        for k, image in zip(jpegs, decoded):
            if isinstance(image, ImageLoadError):
                errors.append((image.index, image.path, image.reason))
            else:
                pixels[k] = image
        for k, kind in enumerate(kinds):
            if kind == "pixels":
                pixels[k] = payloads[k].to(self.device, non_blocking=True)
        good = [k for k, image in enumerate(pixels) if image is not None]
        crop = self.preprocessing.crop_size
        images = torch.full((len(kinds), 3, crop, crop), float("nan"), device=self.device)
        if good:
            images[good] = preprocess_on_device([pixels[k] for k in good], self.preprocessing)
        return images, sorted(errors, key=lambda error: error[0])


def make_device_loader(
    X,
    preprocessing: Preprocessing,
    *,
    device,
    batch_size: int = 32,
    num_workers: int | str = 0,
    on_error: str = "raise",
    indices=None,
    return_errors: bool = False,
    pin_memory: bool | None = None,
) -> DeviceDecodeLoader:
    """A streaming loader over ``X`` whose JPEGs are decoded and every image preprocessed on ``device``.

    The drop-in counterpart of :func:`effsk.data.images.make_loader` for inference with the eval
    transform: same ``X``, same batches, same ``(images, indices[, errors])``, but ``images`` already
    lies on ``device``. Workers (``num_workers``, ``"auto"`` as :func:`resolve_num_workers`) read files,
    parse JPEG headers and decode on the CPU whatever the device decoder does not take. Batches come in
    pinned memory when ``pin_memory`` (default: on CUDA), so that the copies of CPU-decoded pixels to the
    device do not block.

    Examples
    --------
    >>> X = np.zeros((5, 40, 40, 3), dtype=np.uint8)
    >>> loader = make_device_loader(X, Preprocessing(32, 36), device="cpu", batch_size=4)
    >>> [(tuple(images.shape), idx.tolist()) for images, idx in loader]
    [((4, 3, 32, 32), [0, 1, 2, 3]), ((1, 3, 32, 32), [4])]
    """
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error={on_error!r}; use one of {ON_ERROR}")
    num_images(X)
    device = torch.device(device)
    loader = DataLoader(
        _EncodedOrDecoded(X, indices),
        batch_size=batch_size,
        num_workers=resolve_num_workers(num_workers, device),
        collate_fn=_collate,
        pin_memory=device.type == "cuda" if pin_memory is None else pin_memory,
    )
    return DeviceDecodeLoader(loader, preprocessing, device, on_error=on_error, return_errors=return_errors)
