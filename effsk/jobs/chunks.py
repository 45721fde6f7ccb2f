"""A fitted featurizer applied to chunks of images, in this process or on a cluster's workers.

Two things every job shares live here: :func:`featurize_chunk` (one chunk's features plus the images
that could not be read, with their reasons) and :func:`process_featurizer` (one featurizer per process
and configuration, so a worker prepares its model once however many tasks it runs).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import threading
import warnings
from collections import Counter, OrderedDict
from typing import NamedTuple

import numpy as np

from ..data.cache import weights_identity
from ..data.images import ImageLoadError, ImageLoadWarning, load_image

__all__ = ["JOB_ON_ERROR", "Failure", "featurize_chunk", "featurizer_token", "fitted", "numbered",
           "process_featurizer", "with_on_error"]

# "raise" and "nan" as the featurizer's on_error; "skip" leaves the rows out of a job's output.
JOB_ON_ERROR = ("raise", "skip", "nan")
# Featurizers (each holding a model and its prepared device copy) kept per process; a job uses one.
_PROCESS_CACHE_SIZE = 2


class Failure(NamedTuple):
    """An image of a chunk that could not be featurized: its position in the chunk, its path, why."""

    position: int
    path: str | None
    reason: str


def fitted(featurizer):
    """``featurizer`` if it is fitted, else a fitted clone (a job ships one fitted model everywhere)."""
    from sklearn.base import clone
    from sklearn.exceptions import NotFittedError
    from sklearn.utils.validation import check_is_fitted

    try:
        check_is_fitted(featurizer)
        return featurizer
    except NotFittedError:
        return clone(featurizer).fit()


def with_on_error(featurizer, on_error: str):
    """``featurizer`` transforming with the featurizer's ``on_error`` that a job's mode needs.

    A job with ``"skip"`` or ``"nan"`` runs the featurizer with ``on_error="nan"`` and reads the
    failures off the NaN rows. A fitted featurizer is copied shallowly (its model is shared).
    """
    if on_error not in JOB_ON_ERROR:
        raise ValueError(f"on_error={on_error!r}: expected one of {', '.join(map(repr, JOB_ON_ERROR))}")
    wanted = "raise" if on_error == "raise" else "nan"
    if featurizer.get_params()["on_error"] == wanted:
        return featurizer
    return copy.copy(featurizer).set_params(on_error=wanted)


@contextlib.contextmanager
def numbered(index_of):
    """Re-raise a featurizer's :class:`~effsk.data.images.ImageLoadError` naming the item as the job
    knows it: ``index_of(position)``, where the featurizer counted from the start of its chunk."""
    try:
        yield
    except ImageLoadError as exc:
        if exc.index is None:  # the position did not survive (e.g. a DataLoader worker re-raised it)
            raise
        raise ImageLoadError.for_item(index_of(exc.index), exc.path, exc.reason) from None


def featurize_chunk(featurizer, items, start: int = 0) -> tuple[np.ndarray, list[Failure]]:
    """Features of ``items`` (float32, one row per item) and the items that failed.

    With the featurizer's ``on_error="nan"`` a failed item's row is NaN and listed with the reason
    (the loader's own message); with ``"raise"`` the featurizer's
    :class:`~effsk.data.images.ImageLoadError` names the item by ``start`` + its position.
    """
    with warnings.catch_warnings(), numbered(lambda position: start + position):
        # The failures are returned (and reported once per job), not warned about once per chunk.
        warnings.simplefilter("ignore", ImageLoadWarning)
        features = np.asarray(featurizer.transform(items), dtype=np.float32)
    failures = []
    for position in np.flatnonzero(np.isnan(features).all(axis=1)):
        item = items[int(position)]
        path = str(item) if isinstance(item, str) else None
        try:
            load_image(item, int(position))
            reason = "the network gave NaN features"
        except ImageLoadError as exc:
            reason = exc.reason or str(exc)
        failures.append(Failure(int(position), path, reason))
    return features, failures


def featurizer_token(featurizer) -> str:
    """A content key of a fitted featurizer: its parameters and the hash of its weights."""
    params = {name: repr(value) for name, value in featurizer.get_params().items()}
    text = json.dumps({"class": type(featurizer).__qualname__, "params": params,
                       "weights": weights_identity(featurizer.model_)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


_lock = threading.Lock()
_featurizers: OrderedDict[str, object] = OrderedDict()
_loads: Counter = Counter()


def process_featurizer(token: str, featurizer):
    """This process's featurizer for ``token``: the first one it was given, kept for later tasks.

    Every task of a job on a worker then transforms with the same object, which prepares its
    inference model (BatchNorm folded, on the worker's device) on first use and keeps it. Only the
    last few tokens are kept, so a long-lived worker's memory stays bounded.
    """
    with _lock:
        cached = _featurizers.get(token)
        if cached is None:
            _featurizers[token] = cached = featurizer
            _loads[token] += 1
            while len(_featurizers) > _PROCESS_CACHE_SIZE:
                _featurizers.popitem(last=False)
        else:
            _featurizers.move_to_end(token)
        return cached


def process_cache_info() -> dict:
    """``{"tokens": [...], "loads": {token: times it entered this process's cache}}`` (diagnostics)."""
    with _lock:
        return {"tokens": list(_featurizers), "loads": dict(_loads)}
