"""Device, precision and RNG handling shared by every estimator and the training loop."""

from __future__ import annotations

import contextlib
import platform

import torch

__all__ = ["resolve_device", "resolve_precision", "native_cpu_bf16", "prefers_channels_last", "autocast", "forked_rng", "explain_oom"]

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def resolve_device(device="auto") -> torch.device:
    """``"auto"`` -> cuda, then mps, then cpu; anything else goes through ``torch.device``."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device={device!r} is not a valid torch device: {exc}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} was asked for but CUDA is not available on this machine; use device='auto' or 'cpu'.")
    return dev


def native_cpu_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX) and ATen runs its AVX-512 kernels.

    False wherever ``ATEN_CPU_CAPABILITY`` caps the kernels below AVX-512, and on torch builds that
    cannot tell (the probes are private: their absence means "no").
    """
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        return False
    probes = (getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return any(probe is not None and probe() for probe in probes)


def resolve_precision(
    precision: str, device: torch.device, *, inference: bool = False, cpu_bf16: bool = False
) -> torch.dtype | None:
    """Autocast dtype for ``precision`` on ``device``; ``None`` means plain fp32.

    ``"auto"`` on GPUs: fp16 for ``inference``; for training bf16 where supported (no loss scaling
    needed), else fp16. fp16's longer mantissa keeps predictions closer to fp32: Lite0 on 256 photo
    crops, top-1 flips 0.8% and pooled features move 0.5% (median relative L2) against 4.7% and 4% in
    bf16 (tests/test_gpu.py), and inference has no gradients to overflow. On CPU fp32, unless
    ``cpu_bf16`` (the caller's work gains from it) and the CPU has native bf16
    (:func:`native_cpu_bf16`): then bf16. Measured on an AVX512-BF16 CPU (benchmarks/README.md,
    issue 16): feature extraction runs 1.3x as fast in bf16 (b0, 64 px) with transfer accuracy within
    noise of fp32, so the featurizer asks for it; training ran no faster and lost 1.6 points on one
    transfer task, so training stays fp32.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}; use one of {PRECISIONS}")
    if precision == "fp32":
        return None
    if precision == "auto":
        if device.type == "cuda":
            if inference:
                return torch.float16
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_bf16 and device.type == "cpu" and native_cpu_bf16() else None
    return torch.bfloat16 if precision == "bf16" else torch.float16


# Training b0 at 64 px, batch 32, in channels_last against NCHW (benchmarks/finetune.py, plain loops):
# 1.3-1.7x on AVX-512 CPUs; on an AMD EPYC AVX-512 box with ATen's kernels capped at AVX2 (and oneDNN's
# too) 1.14-1.4x, and with ATen's unvectorised DEFAULT kernels 1.17x (oneDNN runs the convolutions
# either way); on one AVX2 machine 0.95x (issue 16). channels_last costs 5% at worst; NCHW 15-40%.
_CHANNELS_LAST_MACHINES = ("x86_64", "amd64", "i686", "i386")


def prefers_channels_last(device: torch.device) -> bool:
    """Whether convolutional networks train faster on ``device`` in the channels_last memory format.

    True on CUDA and on x86 CPUs (whatever ATen's kernel level: oneDNN runs the convolutions); False
    elsewhere (MPS, ARM: unmeasured, NCHW as before). Decided from measurements per kind of device
    rather than timed at run time: a timing on a loaded machine picks at random, and the two formats
    round differently, so the same seed would not give the same model from one process to the next.

    >>> prefers_channels_last(torch.device("cuda"))
    True
    """
    device = torch.device(device)
    if device.type == "cuda":
        return True
    if device.type == "cpu":
        return platform.machine().lower() in _CHANNELS_LAST_MACHINES
    return False


def autocast(device: torch.device, dtype: torch.dtype | None):
    """An autocast context, or a no-op one for fp32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@contextlib.contextmanager
def forked_rng(device: torch.device):
    """Seeded work inside leaves the caller's global RNG (CPU, and ``device``'s on CUDA) as it was.

    >>> state = torch.get_rng_state()
    >>> with forked_rng(torch.device("cpu")):
    ...     _ = torch.manual_seed(0), torch.rand(3)
    >>> torch.equal(torch.get_rng_state(), state)
    True
    """
    devices = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        yield


@contextlib.contextmanager
def explain_oom(inputs, doing: str):
    """Re-raise a CUDA out-of-memory error inside the block with the batch size and what to change."""
    try:
        yield
    except torch.cuda.OutOfMemoryError as exc:
        n = inputs.shape[0] if isinstance(inputs, torch.Tensor) else "?"
        size = "x".join(str(s) for s in inputs.shape[-2:]) if isinstance(inputs, torch.Tensor) else "?"
        smaller = max(1, n // 2) if isinstance(n, int) else "a smaller value"
        freezing = ", or freezing more of the network (freeze='backbone' or an int)" if doing.startswith("training") else ""
        raise torch.cuda.OutOfMemoryError(
            f"CUDA ran out of memory {doing} a batch of {n} images at {size} px (batch_size={n}). "
            f"Try a smaller batch_size (e.g. batch_size={smaller}), mixed precision (precision='bf16' or "
            f"'fp16'), a lower resolution{freezing}."
        ) from exc
