"""A per-image feature cache on disk.

Rows live under ``<location>/effsk-features/<config digest>/<ab>/<image digest>.npy``: one directory per
configuration (everything that changes features), one file per image content. A changed image hashes to
another file and a changed configuration to another directory, so nothing stale is ever read. Writes are
atomic (temporary file in the same directory, fsync, ``os.replace``), so concurrent GridSearchCV workers
and interrupted runs never leave a half-written row behind.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np
import torch

from ..utils.fileio import atomic_write_bytes
from sklearn.utils.validation import check_memory

__all__ = ["FeatureCache", "open_feature_cache", "weights_identity", "atomic_write_bytes"]

FORMAT_VERSION = 1


def weights_identity(model: torch.nn.Module) -> str:
    """Content hash of a model's state_dict (names, dtypes, shapes and values).

    Hashing the weights themselves, rather than naming where they came from, also covers random
    initialisation (``weights=None`` differs on every fit) and a checkpoint rewritten in place.
    """
    digest = hashlib.blake2b(digest_size=20)
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class FeatureCache:
    """Feature rows of one configuration, keyed by image content digest.

    Parameters
    ----------
    location : path
        Cache root (a ``joblib.Memory`` location).
    config : dict
        JSON-serialisable description of everything that changes the features.
    n_features : int
        Row width; a stored row of another shape is treated as missing.
    """

    def __init__(self, location: str | os.PathLike, config: dict, n_features: int):
        text = json.dumps({"format": FORMAT_VERSION, **config}, sort_keys=True, default=str)
        self.directory = Path(location) / "effsk-features" / hashlib.blake2b(text.encode(), digest_size=16).hexdigest()
        self.n_features = int(n_features)
        self.directory.mkdir(parents=True, exist_ok=True)
        description = self.directory / "config.json"
        if not description.exists():  # for people browsing the cache
            atomic_write_bytes(description, text.encode())

    def _path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.npy"

    def get(self, key: str | None) -> np.ndarray | None:
        """The stored row for ``key``, or ``None``."""
        if key is None:
            return None
        try:
            row = np.load(self._path(key), allow_pickle=False)
        except (OSError, ValueError, EOFError):
            return None
        if row.shape != (self.n_features,) or row.dtype != np.float32:
            return None
        return row

    def put(self, key: str | None, row: np.ndarray) -> None:
        """Store ``row`` under ``key`` atomically."""
        if key is None:
            return
        path = self._path(key)
        path.parent.mkdir(exist_ok=True)
        buffer = _npy_bytes(np.ascontiguousarray(row, dtype=np.float32))
        atomic_write_bytes(path, buffer)


def _npy_bytes(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, array, allow_pickle=False)
    return out.getvalue()


def open_feature_cache(memory, config: dict, n_features: int) -> FeatureCache | None:
    """A :class:`FeatureCache` under ``memory`` (a path or ``joblib.Memory``), or ``None`` for no caching."""
    if isinstance(memory, os.PathLike):
        memory = os.fspath(memory)
    location = check_memory(memory).location
    if location is None:
        return None
    return FeatureCache(location, config, n_features)
