"""Featurize on a Dask cluster: a lazy Dask DataFrame of features, and the chunks of ``effsk featurize --dask``.

Needs the ``dask`` extra (``pip install "effsk[dask]"``); importing this module does not.

How the work travels: the fitted featurizer is one node of the graph (pickled once, fetched once by
each worker that needs it, and rebuilt from the graph if the worker holding it dies); every task
carries only its paths. Each worker process keeps the featurizer it was given per configuration
(:func:`effsk.jobs.chunks.process_featurizer`), so it prepares its inference model once, on its own
device (a worker that sees a GPU uses it with ``device="auto"``), however many partitions it runs.
"""

from __future__ import annotations

import contextlib
import os
import uuid
import warnings

import numpy as np
import pandas as pd

from .chunks import featurize_chunk, featurizer_token, fitted, numbered, process_featurizer

__all__ = ["WORKER_CONFIG", "featurize", "map_chunks"]

# Dask's nannies start workers with MALLOC_TRIM_THRESHOLD_=65536. Setting it fixes glibc's mmap
# threshold and hands freed memory straight back to the system, so torch's CPU inference page-faults
# its activations on every batch: about 3x slower (benchmarks/README.md, "Scale out"). With these, freed
# memory up to 128 MiB is kept for reuse. ``with dask.config.set(WORKER_CONFIG): LocalCluster(...)``;
# for ``dask worker`` put the two variables under distributed.nanny.pre-spawn-environ in a YAML config.
WORKER_CONFIG = {
    "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": 2**27,
    "distributed.nanny.pre-spawn-environ.MALLOC_MMAP_THRESHOLD_": 2**25,
}

_INSTALL = 'Dask is not installed; install the extra: pip install "effsk[dask]"'


def _import(module: str):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError as exc:
        raise ImportError(f"{_INSTALL} ({exc})") from exc


def _featurizer_node(featurizer, token: str):
    # One graph node holds the featurizer, keyed by its content: tasks refer to it, none embeds it.
    dask = _import("dask")
    return dask.delayed(featurizer, name=f"effsk-featurizer-{token}", pure=True)


def featurize(images, featurizer):
    """Features of a Dask collection of images, as a lazy Dask DataFrame.

    Parameters
    ----------
    images : dask.dataframe.Series or one-column dask.dataframe.DataFrame
        Image file paths (which every worker can read) or encoded image bytes (Dask turns object
        columns into text unless ``dask.config.set({"dataframe.convert-string": False})``).
    featurizer : EfficientNetFeaturizer
        Fitted, or fitted here once (so every partition uses the same weights). Its ``on_error``
        applies: ``"raise"`` fails the computation naming the row's index label, path and reason;
        ``"nan"`` gives the row NaN features.

    Returns
    -------
    dask.dataframe.DataFrame
        float32 columns ``featurizer.get_feature_names_out()``, with the index and partitions of
        ``images``. Nothing runs until it is computed (``.compute()``, ``.to_parquet(...)``, ...).

    Examples
    --------
    >>> import dask.dataframe as dd                                  # doctest: +SKIP
    >>> paths = dd.read_csv("images.csv")["path"]                    # doctest: +SKIP
    >>> features = featurize(paths, EfficientNetFeaturizer("lite0")) # doctest: +SKIP
    >>> features.to_parquet("features/")                             # doctest: +SKIP
    """
    dd = _import("dask.dataframe")
    if isinstance(images, dd.DataFrame):
        if len(images.columns) != 1:
            raise ValueError(f"images is a Dask DataFrame with columns {list(images.columns)!r}; "
                             "pass one column of paths or bytes (e.g. df['path']).")
    elif not isinstance(images, dd.Series):
        raise TypeError(f"images must be a Dask Series or one-column Dask DataFrame, got {type(images).__name__}; "
                        "for in-memory data call featurizer.transform directly.")
    featurizer = fitted(featurizer)
    token = featurizer_token(featurizer)
    names = list(featurizer.get_feature_names_out())
    index = dd.utils.make_meta(images).index
    meta = pd.DataFrame({name: pd.Series(dtype=np.float32, index=index) for name in names}, index=index)
    return images.map_partitions(_featurize_partition, _featurizer_node(featurizer, token), token, meta=meta)


def _featurize_partition(part, featurizer, token: str) -> pd.DataFrame:
    featurizer = process_featurizer(token, featurizer)
    names = featurizer.get_feature_names_out()
    items = part if isinstance(part, pd.Series) else part.iloc[:, 0]
    if not len(items):
        return pd.DataFrame(np.empty((0, len(names)), np.float32), columns=names, index=part.index)
    with numbered(lambda position: items.index[position]):  # the user knows a row by its index label
        features = featurizer.transform(items.to_numpy(dtype=object))
    return pd.DataFrame(features, columns=names, index=part.index)


@contextlib.contextmanager
def _connected(scheduler):
    distributed = _import("distributed")
    if isinstance(scheduler, distributed.Client):
        yield scheduler
        return
    scheduler = os.fspath(scheduler)
    if scheduler.endswith(".json") and os.path.isfile(scheduler):
        client = distributed.Client(scheduler_file=scheduler, set_as_default=False)
    else:
        client = distributed.Client(scheduler, set_as_default=False)
    with client:
        yield client


def map_chunks(scheduler, featurizer, chunks: dict[int, list], *, max_in_flight: int | None = None):
    """Featurize ``chunks`` on a Dask cluster; yield ``(start, (features, failures))`` per chunk.

    ``chunks`` maps each chunk's start (its first item's index in the job) to its items.

    Results come in the order the cluster finishes them (see :func:`effsk.jobs.chunks.featurize_chunk`).
    At most ``max_in_flight`` chunks (default: twice the cluster's threads) are submitted at a time,
    so neither the cluster nor this process holds more than a few chunks' features however many there
    are. A task's error (``on_error="raise"``) is raised here and the remaining tasks are cancelled;
    a worker that dies has its chunks recomputed elsewhere.

    ``scheduler`` is a scheduler address, a scheduler file (``.json``) or a ``distributed.Client``.
    """
    if not chunks:
        return
    distributed = _import("distributed")
    with _connected(scheduler) as client:
        token = featurizer_token(featurizer)
        with warnings.catch_warnings():
            # Dask warns about graphs over 10 MB; this one is the featurizer itself, sent once on purpose.
            warnings.filterwarnings("ignore", message="Sending large graph")
            remote = client.compute(_featurizer_node(featurizer, token))
        limit = max_in_flight or 2 * max(1, sum(client.nthreads().values()))
        waiting = iter(chunks.items())
        running, starts = distributed.as_completed(loop=client.loop), {}

        def submit_next():
            for start, items in waiting:
                future = client.submit(_featurize_chunk_task, _absolute(items), start, remote, token,
                                       key=f"effsk-chunk-{start}-{uuid.uuid4().hex[:8]}")
                starts[future] = start
                running.add(future)
                return

        try:
            for _ in range(limit):
                submit_next()
            for future in running:
                result = future.result()
                yield starts.pop(future), result
                submit_next()
        finally:
            client.cancel([*starts, remote])


def _absolute(items: list) -> list:
    """Relative paths as absolute ones: workers resolve paths in their own working directory, not ours."""
    return [os.path.abspath(item) if isinstance(item, (str, os.PathLike)) else item for item in items]


def _featurize_chunk_task(items, start: int, featurizer, token: str):
    return featurize_chunk(process_featurizer(token, featurizer), items, start)
