"""Device, precision and RNG handling shared by every estimator and the training loop."""

from __future__ import annotations

import contextlib

import torch

__all__ = ["resolve_device", "resolve_precision", "prefers_channels_last", "autocast", "forked_rng", "explain_oom"]

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


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for ``precision`` on ``device``; ``None`` means plain fp32.

    ``"auto"``: bf16 on GPUs that support it, else fp16; fp32 on CPU. On CPUs with native bf16
    (AVX512-BF16, AMX) bf16 autocast was measured (b0, 64-128 px, channels_last) to train 0.5-0.7x as
    fast as fp32, and to predict 1.3-2x as fast but about 1% off fp32 outputs, so ``"auto"`` keeps
    fp32 there; ask for ``"bf16"`` to trade that accuracy for speed when predicting.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}; use one of {PRECISIONS}")
    if precision == "fp32":
        return None
    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if precision == "bf16" else torch.float16


# ATen CPU kernels (torch.backends.cpu.get_cpu_capability()) on which training in channels_last measured
# faster than NCHW (b0, 64 px, batch 32): 1.3-1.7x on AVX-512 CPUs; on an AMD EPYC AVX-512 box made an
# AVX2 one (ATEN_CPU_CAPABILITY=avx2, and oneDNN too with ONEDNN_MAX_CPU_ISA=AVX2) 1.2-1.4x; on one
# AVX2 machine 0.95x (issue 16). channels_last there costs 5%; NCHW elsewhere 20-40%.
_CHANNELS_LAST_CPU_CAPABILITIES = ("AVX2", "AVX512")


def prefers_channels_last(device: torch.device) -> bool:
    """Whether convolutional networks train faster on ``device`` in the channels_last memory format.

    True on CUDA, and on x86 CPUs whose ATen kernels are AVX2 or AVX-512 ones; False elsewhere (MPS,
    ARM, older x86: unmeasured, NCHW as before). Decided from measurements per kind of device rather
    than timed at run time: a timing on a loaded machine picks at random, and the two formats round
    differently, so the same seed would not give the same model from one process to the next.

    >>> prefers_channels_last(torch.device("cuda"))
    True
    """
    device = torch.device(device)
    if device.type == "cuda":
        return True
    if device.type == "cpu":
        return torch.backends.cpu.get_cpu_capability() in _CHANNELS_LAST_CPU_CAPABILITIES
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
