"""effsk checkpoints: one self-describing file per trained model, and safe reading of weights files.

An effsk checkpoint is a ``torch.save`` of a plain dict::

    {"format": "effsk.weights.checkpoint", "format_version": 1,
     "arch": {...Scaling.as_dict(), "same_padding", "num_classes", "in_chans"},
     "preprocessing": {...Preprocessing.to_dict()},
     "classes": [...] or None, "metadata": {...},
     "effsk_version": "...", "torch_version": "...",
     "state_dict": {name: tensor}}

Everything in it is a tensor or a plain Python value, so it loads with ``torch.load(weights_only=True)``:
no pickled code is ever executed. Readers ignore top-level keys they do not know, so later versions
can add entries without breaking older files; ``format_version`` changes only when a field's meaning
changes.
"""

from __future__ import annotations

import numbers
import os
import pickle
import re
from collections.abc import Mapping

import numpy as np
import torch

try:  # optional: only .safetensors files (the Hugging Face Hub's format) need it
    from safetensors.torch import load_file as load_safetensors
except ImportError:  # pragma: no cover - depends on the environment
    load_safetensors = None

from .._version import __version__
from ..utils.fileio import atomic_torch_save
from ..data.preprocessing import Preprocessing
from ..scaling import Scaling

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "CheckpointError",
    "atomic_torch_save",
    "read_weights_file",
    "as_state_dict",
    "architecture",
    "save_checkpoint",
    "load_checkpoint",
    "validate_checkpoint",
    "is_checkpoint",
]

FORMAT = "effsk.weights.checkpoint"
FORMAT_VERSION = 1
_REQUIRED = ("arch", "preprocessing", "state_dict")
_ARCH_FIELDS = tuple(Scaling.__dataclass_fields__) + ("same_padding", "num_classes", "in_chans")


class CheckpointError(ValueError):
    """A weights file that cannot be used: unreadable, unsafe, not a checkpoint, or for another model."""


_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_REFUSED = re.compile(r"WeightsUnpickler error:\s*(.+?)(?: was not an allowed global|\n\n|$)", re.S)


def read_weights_file(path):
    """Load a weights file with ``torch.load(weights_only=True, map_location="cpu")``, or a
    ``.safetensors`` file with safetensors (which holds tensors only).

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist.
    CheckpointError
        The file is empty, truncated or corrupt, not a ``torch.save`` file, or holds pickled objects
        other than tensors and plain containers (refused, never executed).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"weights file {path!r} does not exist")
    if os.path.isdir(path):
        raise CheckpointError(f"weights path {path!r} is a directory; expected a checkpoint file")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"weights file {path!r} is empty (0 bytes); expected a torch.save checkpoint")
    if path.endswith(".safetensors"):
        return _read_safetensors(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "Weights only load failed" in text:
            found = _REFUSED.search(text)
            detail = found.group(1).strip() if found else "objects outside the weights-only allowlist"
            raise CheckpointError(
                f"weights file {path!r} was refused: it contains pickled Python objects, not just tensors "
                f"and plain containers ({detail}). effsk loads weights with torch.load(weights_only=True), "
                "so nothing in the file was executed; only use files from sources you trust, re-saved as "
                "a state_dict or an effsk checkpoint."
            ) from None
        raise _unreadable(path, exc) from None
    except Exception as exc:  # torch raises RuntimeError / EOFError / KeyError / ... for damaged files
        raise _unreadable(path, exc) from None


def as_state_dict(obj, path) -> dict:
    """A loaded weights file as a plain state_dict, without the prefixes DistributedDataParallel
    (``module.``) and ``torch.compile`` (``_orig_mod.``) add; a CheckpointError saying what the file
    holds instead when it is not one."""
    if isinstance(obj, Mapping) and obj and all(isinstance(k, str) for k in obj) and all(
        isinstance(v, torch.Tensor) for v in obj.values()
    ):
        state_dict = dict(obj)
        for prefix in _WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in state_dict):
                state_dict = {k[len(prefix) :]: v for k, v in state_dict.items()}
        return state_dict
    hint = ""
    if isinstance(obj, Mapping):
        nested = [k for k, v in obj.items() if isinstance(v, Mapping)]
        if nested:
            key = nested[0]
            hint = f"; if the weights sit under {key!r}, save that entry alone: torch.save(obj[{key!r}], path)"
    raise CheckpointError(
        f"{os.fspath(path)!r} is not a weights file effsk can use: expected an effsk checkpoint or a state_dict "
        f"(a dict of parameter names to tensors), found {describe_loaded(obj)}{hint}"
    )


def _read_safetensors(path: str) -> dict:
    if load_safetensors is None:
        raise CheckpointError(f"weights file {path!r} is a safetensors file; reading it needs the safetensors "
                              "package: pip install safetensors")
    try:
        return load_safetensors(path, device="cpu")
    except Exception as exc:  # safetensors raises SafetensorError / OSError for damaged files
        reason = str(exc).splitlines()[0] if str(exc) else "no further detail"
        raise CheckpointError(
            f"weights file {path!r} ({os.path.getsize(path):,} bytes) cannot be read as safetensors: it is "
            f"truncated, corrupt or not a safetensors file ({type(exc).__name__}: {reason[:200]})"
        ) from None


def _unreadable(path: str, exc: Exception) -> CheckpointError:
    # torch's messages run on with advice; the first sentence names the fault.
    reason = str(exc).splitlines()[0].split(". ")[0] if str(exc) else "no further detail"
    return CheckpointError(
        f"weights file {path!r} ({os.path.getsize(path):,} bytes) cannot be read as a PyTorch checkpoint: "
        f"it is truncated, corrupt or not a torch.save file ({type(exc).__name__}: {reason[:200]})"
    )


def architecture(model) -> dict:
    """The config that rebuilds ``model``: ``Scaling.as_dict()`` plus padding, classes and input channels."""
    head = model.get_classifier()
    first_conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    return {
        **model.scaling.as_dict(),
        "same_padding": bool(getattr(model, "same_padding", False)),
        "num_classes": int(head.out_features) if isinstance(head, torch.nn.Linear) else 0,
        "in_chans": int(first_conv.in_channels),
    }


def _plain(value, where: str):
    """``value`` as types that ``torch.load(weights_only=True)`` reads back; numpy becomes Python."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, (np.ndarray, np.generic)):
        return _plain(value.tolist(), where)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"{where}: key {k!r} is a {type(k).__name__}; checkpoint keys must be str or int")
            out[k] = _plain(v, f"{where}[{k!r}]")
        return out
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise TypeError(
        f"{where} is a {type(value).__name__}; a checkpoint stores only tensors, numbers, strings, None "
        "and lists/dicts of them (so that it loads without executing code)"
    )


def _unwrap(model):
    """The effsk model (anything :func:`effsk.nn.build` makes) inside DDP / torch.compile wrappers."""
    while not isinstance(getattr(model, "scaling", None), Scaling):
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            raise TypeError(f"save_checkpoint needs an effsk model (effsk.nn.build), got {type(model).__name__}")
        model = inner
    return model


def save_checkpoint(path, model, preprocessing: Preprocessing, *, classes=None, metadata=None, extra=None) -> str:
    """Save ``model`` with everything needed to rebuild and use it, atomically.

    Parameters
    ----------
    path : str or PathLike
        Destination; parent directories are created.
    model : EfficientNet
        The model (DDP / ``torch.compile`` wrappers are unwrapped). Tensors are stored on CPU.
    preprocessing : Preprocessing
        The input transform the weights expect.
    classes : array-like, optional
        Class labels in output order (str, int, float or bool), for example a classifier's ``classes_``.
    metadata : dict, optional
        Training metadata (epochs, scores, dataset name...): tensors, numbers, strings, lists, dicts.
    extra : dict, optional
        Further top-level entries for formats built on this one; they must not shadow the core keys.

    Returns
    -------
    str
        The absolute path written.

    Examples
    --------
    >>> import os, tempfile
    >>> from effsk.weights import build_model
    >>> model, prep = build_model("lite0", num_classes=3)
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     path = save_checkpoint(os.path.join(tmp, "m.pt"), model, prep, classes=["a", "b", "c"])
    ...     ckpt = load_checkpoint(path)
    >>> ckpt["arch"]["name"], ckpt["arch"]["num_classes"], ckpt["classes"]
    ('lite0', 3, ['a', 'b', 'c'])
    """
    model = _unwrap(model)
    if not isinstance(preprocessing, Preprocessing):
        raise TypeError(f"preprocessing must be a Preprocessing, got {type(preprocessing).__name__}")
    if classes is not None:
        # list(), not np.asarray(): mixed labels such as [1, "a"] must not all become strings.
        classes = _plain(classes.tolist() if isinstance(classes, np.ndarray) else list(classes), "classes")
        outputs = architecture(model)["num_classes"]
        if len(classes) != outputs:
            raise ValueError(f"{len(classes)} class labels for a model with {outputs} outputs")
        if not all(isinstance(c, (str, int, float, bool)) for c in classes):
            raise TypeError("classes must be str, int, float or bool labels")
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "arch": architecture(model),
        "preprocessing": preprocessing.to_dict(),
        "classes": classes,
        "metadata": _plain(dict(metadata or {}), "metadata"),
        "effsk_version": __version__,
        "torch_version": torch.__version__.split("+")[0],
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    for key, value in (extra or {}).items():
        if key in payload:
            raise ValueError(f"extra entry {key!r} would overwrite the checkpoint's own {key!r}")
        payload[key] = _plain(value, f"extra[{key!r}]")
    return atomic_torch_save(payload, path)


def is_checkpoint(obj) -> bool:
    """Whether a loaded object is an effsk checkpoint (as opposed to a plain state_dict)."""
    return isinstance(obj, Mapping) and obj.get("format") == FORMAT


def load_checkpoint(path) -> dict:
    """Read and validate an effsk checkpoint without executing pickled code.

    Returns
    -------
    dict
        ``format``, ``format_version``, ``arch``, ``preprocessing`` (dicts), ``classes`` (list or None),
        ``metadata`` (dict), ``state_dict`` and any further entries the file holds.

    Raises
    ------
    CheckpointError
        Unreadable or unsafe file, a file that is not an effsk checkpoint, a newer format version, or
        missing fields; the message names the path and what was found.
    """
    return validate_checkpoint(read_weights_file(path), path)


def validate_checkpoint(payload, path) -> dict:
    """Check an already loaded object is a usable effsk checkpoint (see :func:`load_checkpoint`)."""
    path = os.fspath(path)
    if not is_checkpoint(payload):
        raise CheckpointError(f"{path!r} is not an effsk checkpoint: found {describe_loaded(payload)}")
    version = payload.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise CheckpointError(f"{path!r}: format_version {version!r} is not valid; expected an integer >= 1")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path!r} uses effsk checkpoint format version {version}, newer than the version {FORMAT_VERSION} "
            "this effsk reads; upgrade effsk"
        )
    missing = [k for k in _REQUIRED if k not in payload]
    if missing:
        raise CheckpointError(f"{path!r}: effsk checkpoint lacks {missing}")
    missing = [k for k in _ARCH_FIELDS if k not in payload["arch"]]
    if missing:
        raise CheckpointError(f"{path!r}: the checkpoint's arch config lacks {missing}")
    payload.setdefault("classes", None)
    payload.setdefault("metadata", {})
    return payload


def describe_loaded(obj) -> str:
    """A short description of what ``torch.load`` returned, for error messages."""
    if isinstance(obj, Mapping):
        keys = list(obj)
        shown = ", ".join(repr(k) for k in keys[:5]) + (", ..." if len(keys) > 5 else "")
        return f"a dict with {len(keys)} keys ({shown})"
    if isinstance(obj, torch.Tensor):
        return f"a single tensor of shape {tuple(obj.shape)}"
    return f"a {type(obj).__name__}"
