"""Atomic file writes: a reader never sees a half-written checkpoint, cache entry or log."""

from __future__ import annotations

import contextlib
import os
import tempfile

__all__ = ["atomic_write", "atomic_save_torch"]


@contextlib.contextmanager
def atomic_write(path, mode: str = "wb"):
    """Open a temp file next to ``path``; on success fsync and ``os.replace`` it into place.

    On any exception the temp file is removed and ``path`` is left as it was.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_save_torch(obj, path) -> None:
    """``torch.save`` through :func:`atomic_write`."""
    import torch

    with atomic_write(path) as fh:
        torch.save(obj, fh)
