"""Atomic file writes: a reader never sees a half-written checkpoint, cache entry or log.

Every write goes to a temporary file in the destination's directory, is flushed and fsync-ed, then
``os.replace``-d into place (atomic on POSIX and Windows), and the directory entry is fsync-ed.
"""

from __future__ import annotations

import contextlib
import os
import uuid

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_torch_save"]


def _fsync_directory(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open directories; the rename is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path, mode: str = "wb"):
    """Open a temp file next to ``path``; on success fsync and ``os.replace`` it into place.

    On any exception the temp file is removed and ``path`` is left as it was. New files get the
    usual permissions (0o666 minus the umask), not mkstemp's owner-only 0o600.
    """
    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
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
    _fsync_directory(directory)


def atomic_write_bytes(path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_write(path) as fh:
        fh.write(data)


def atomic_torch_save(obj, path) -> str:
    """``torch.save(obj, path)`` atomically; returns the absolute path written."""
    import torch

    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    with atomic_write(path) as fh:
        torch.save(obj, fh)
    return path
