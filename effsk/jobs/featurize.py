"""``effsk featurize``: images in, a parquet file of features keyed by path out.

Work is cut into chunks of paths. Each finished chunk is written atomically as its own part file
(with the hash of its path list), so an interrupted run resumes without redoing finished chunks.
Under ``torchrun`` rank r takes chunks r, r + world, ... and writes its own output file; with
``dask=`` the chunks run as tasks on a Dask cluster (:mod:`effsk.jobs.dask`) and this process writes
the parts. Images that cannot be read raise, become NaN rows, or are left out (``on_error``); either
way they are listed in the output's metadata.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os

import numpy as np
import pandas as pd

from ..training import distributed
from ..data.cache import weights_identity
from ..data.datasets import list_images
from ..utils.fileio import atomic_write
from .chunks import featurize_chunk, fitted, with_on_error

__all__ = ["featurize_to_parquet", "read_features", "read_metadata"]

METADATA_KEY = b"effsk"
# Settings that change how fast features come, not which: a part computed under any of them is reusable.
# (A part stores failed images as NaN rows plus their reasons, so it serves "skip" and "nan" alike.)
_RUNTIME_ONLY = {"verbose", "num_workers", "batch_size", "device", "memory", "on_error"}


def _chunk_id(paths: list[str], config: str) -> str:
    # A part is reusable only for the same paths featurized with the same configuration.
    return hashlib.sha256("\n".join([config, *paths]).encode()).hexdigest()[:16]


def _with_metadata(table, metadata: dict):
    meta = dict(table.schema.metadata or {})
    meta[METADATA_KEY] = json.dumps(metadata, default=str).encode()
    return table.replace_schema_metadata(meta)


def _write_parquet(df: pd.DataFrame, path: str, metadata: dict) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(df, preserve_index=False)
    with atomic_write(path) as fh:
        pq.write_table(_with_metadata(table, metadata), fh)


def read_metadata(path) -> dict:
    """The effsk metadata of a features parquet file, without reading its rows."""
    import pyarrow.parquet as pq

    return json.loads((pq.read_schema(path).metadata or {}).get(METADATA_KEY, b"{}"))


def read_features(path) -> tuple[pd.DataFrame, dict]:
    """Read a features parquet file and its effsk metadata (model config, feature names, failures).

    ``metadata["failures"]`` lists the images that could not be read (``index`` in the source's
    path list, ``path``, ``reason``); ``metadata["on_error"]`` says whether their rows were left out
    (``"skip"``) or hold NaN (``"nan"``).
    """
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    meta = json.loads((table.schema.metadata or {}).get(METADATA_KEY, b"{}"))
    return table.to_pandas(), meta


def _output_path(output: str, env: distributed.DistEnv) -> str:
    if not env.is_distributed:
        return output
    stem, ext = os.path.splitext(output)
    return f"{stem}.rank{env.rank:04d}-of-{env.world_size:04d}{ext or '.parquet'}"


def _job_metadata(featurizer, source, paths: list[str]) -> tuple[dict, str]:
    """The output's metadata, and the configuration string that keys reusable parts."""
    metadata = {"featurizer": {k: repr(v) for k, v in featurizer.get_params().items()},
                "feature_names": list(featurizer.get_feature_names_out()), "source": str(source),
                "n_images": len(paths)}
    if hasattr(featurizer, "preprocessing_"):
        metadata["preprocessing"] = featurizer.preprocessing_.to_dict()
    config = {k: v for k, v in metadata["featurizer"].items() if k not in _RUNTIME_ONLY}
    # weights=None means a random model per fit: parts are only reusable for the very same weights.
    config["weights_identity"] = weights_identity(featurizer.model_)
    return metadata, json.dumps(config, sort_keys=True)


def _reusable(part: str, on_error: str) -> bool:
    # A part holding failed images cannot serve a run that must raise on them: recompute it (and raise).
    return os.path.exists(part) and not (on_error == "raise" and read_metadata(part).get("failures"))


def _local_chunks(featurizer, chunks: dict[int, list[str]]):
    for start, chunk in chunks.items():
        yield start, featurize_chunk(featurizer, chunk, start)


def featurize_to_parquet(
    source,
    output,
    *,
    featurizer,
    path_column: str = "path",
    chunk_size: int = 512,
    resume: bool = True,
    on_error: str | None = None,
    dask=None,
    verbose: int = 1,
) -> str:
    """Featurize every image of ``source`` into ``output`` (parquet); return the file written.

    Parameters
    ----------
    source : str or path
        A directory (recursive), a glob pattern, or a CSV/parquet table with ``path_column``.
    output : str or path
        The parquet file to write. Part files live in ``<output>.parts/`` until the run completes.
    featurizer : EfficientNetFeaturizer
        An unfitted or fitted featurizer; it is fitted here if needed.
    chunk_size : int
        Paths per part file: the unit of resumption (and of a Dask task).
    resume : bool
        Reuse finished part files from an interrupted run (they are checked against their paths).
        Parts are reusable across ``on_error`` modes, so a run that stopped on a bad file can be
        resumed with ``on_error="skip"`` without redoing the chunks before it.
    on_error : {"raise", "skip", "nan"}, optional
        An image that cannot be read: raise :class:`~effsk.data.images.ImageLoadError`, leave its
        row out, or give it NaN features. Skipped and NaN rows are listed (index, path, reason) in
        the output's metadata under ``"failures"``. Default: the featurizer's own ``on_error``.
    dask : str or distributed.Client, optional
        Run the chunks on a Dask cluster: a scheduler address (``tcp://host:8786``), a scheduler
        file (``.json``) or a client. The workers must see the image paths; this process writes
        the output. Not combinable with ``torchrun``.
    """
    output = os.fspath(output)
    on_error = featurizer.get_params()["on_error"] if on_error is None else on_error
    env = distributed.from_environ()
    if dask is not None and env.is_distributed:
        raise ValueError("featurize runs either under torchrun (one shard per rank) or on a Dask cluster, "
                         f"not both: WORLD_SIZE={env.world_size} and dask={dask!r}")
    paths = list_images(source, path_column=path_column)
    featurizer = fitted(with_on_error(featurizer, on_error))
    metadata, config = _job_metadata(featurizer, source, paths)
    starts = range(0, len(paths), chunk_size)
    chunks = [paths[start : start + chunk_size] for start in starts]
    mine = list(range(env.rank, len(chunks), env.world_size))
    target = _output_path(output, env)
    parts_dir = target + ".parts"
    os.makedirs(parts_dir, exist_ok=True)
    part_files = {i: os.path.join(parts_dir, f"part-{i:06d}-{_chunk_id(chunks[i], config)}.parquet") for i in mine}
    todo = {starts[i]: chunks[i] for i in mine if not (resume and _reusable(part_files[i], on_error))}

    if dask is None:
        results = _local_chunks(featurizer, todo)
    else:
        from .dask import map_chunks

        results = map_chunks(dask, featurizer, todo)

    from tqdm.auto import tqdm

    names = metadata["feature_names"]
    total = sum(len(chunks[i]) for i in mine)
    with contextlib.closing(results), tqdm(total=total, unit="img", disable=not verbose, desc="featurize") as bar:
        bar.update(total - sum(map(len, todo.values())))
        for start, (features, failures) in results:
            i = start // chunk_size
            frame = pd.DataFrame(features, columns=names)
            frame.insert(0, "path", chunks[i])
            _write_parquet(frame, part_files[i], {"chunk": i, "failures": [list(f) for f in failures]})
            bar.update(len(chunks[i]))

    ordered = [(starts[i], part_files[i]) for i in mine]
    _assemble(ordered, target, {**metadata, "rank": env.rank, "world_size": env.world_size}, on_error)
    for _, part in ordered:
        os.unlink(part)
    if not os.listdir(parts_dir):
        os.rmdir(parts_dir)
    return target


def _assemble(parts: list[tuple[int, str]], target: str, metadata: dict, on_error: str) -> None:
    """Concatenate the parts into ``target`` one at a time (memory holds one part, not the output)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    recorded = {part: read_metadata(part).get("failures", []) for _, part in parts}
    failures = [{"index": start + pos, "path": path, "reason": reason}
                for start, part in parts for pos, path, reason in recorded[part]]
    metadata = {**metadata, "on_error": on_error, "failures": failures}
    with atomic_write(target) as fh:
        writer = None
        for start, part in parts:
            table = pq.read_table(part)
            if on_error == "skip" and recorded[part]:
                keep = np.ones(table.num_rows, dtype=bool)
                keep[[pos for pos, _, _ in recorded[part]]] = False
                table = table.filter(pa.array(keep))
            if writer is None:
                writer = pq.ParquetWriter(fh, _with_metadata(table, metadata).schema)
            writer.write_table(table.cast(writer.schema))
        if writer is None:  # this rank had no chunks
            names = metadata["feature_names"]
            empty = pd.DataFrame({"path": pd.Series(dtype=object), **{n: pd.Series(dtype=np.float32) for n in names}})
            pq.write_table(_with_metadata(pa.Table.from_pandas(empty, preserve_index=False), metadata), fh)
        else:
            writer.close()
