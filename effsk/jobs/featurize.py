"""``effsk featurize``: images in, a parquet file of features keyed by path out.

Work is cut into chunks of paths. Each finished chunk is written atomically as its own part file
(with the hash of its path list), so an interrupted run resumes without redoing finished chunks.
Under ``torchrun`` rank r takes chunks r, r + world, ... and writes its own output file.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pandas as pd

from ..training import distributed
from ..data.cache import weights_identity
from ..data.datasets import list_images
from ..utils.fileio import atomic_write

__all__ = ["featurize_to_parquet", "read_features"]

METADATA_KEY = b"effsk"


def _chunk_id(paths: list[str], config: str) -> str:
    # A part is reusable only for the same paths featurized with the same configuration.
    return hashlib.sha256("\n".join([config, *paths]).encode()).hexdigest()[:16]


def _write_parquet(df: pd.DataFrame, path: str, metadata: dict) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(df, preserve_index=False)
    meta = dict(table.schema.metadata or {})
    meta[METADATA_KEY] = json.dumps(metadata, default=str).encode()
    with atomic_write(path) as fh:
        pq.write_table(table.replace_schema_metadata(meta), fh)


def read_features(path) -> tuple[pd.DataFrame, dict]:
    """Read a features parquet file and its effsk metadata (model config, feature names)."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    meta = json.loads((table.schema.metadata or {}).get(METADATA_KEY, b"{}"))
    return table.to_pandas(), meta


def _output_path(output: str, env: distributed.DistEnv) -> str:
    if not env.is_distributed:
        return output
    stem, ext = os.path.splitext(output)
    return f"{stem}.rank{env.rank:04d}-of-{env.world_size:04d}{ext or '.parquet'}"


def featurize_to_parquet(
    source,
    output,
    *,
    featurizer,
    path_column: str = "path",
    chunk_size: int = 512,
    resume: bool = True,
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
        Paths per part file: the unit of resumption.
    resume : bool
        Reuse finished part files from an interrupted run (they are checked against their paths).
    """
    from sklearn.base import clone
    from sklearn.utils.validation import check_is_fitted
    from sklearn.exceptions import NotFittedError

    output = os.fspath(output)
    env = distributed.from_environ()
    paths = list_images(source, path_column=path_column)
    chunks = [paths[i : i + chunk_size] for i in range(0, len(paths), chunk_size)]
    mine = list(range(env.rank, len(chunks), env.world_size))
    target = _output_path(output, env)
    parts_dir = target + ".parts"
    os.makedirs(parts_dir, exist_ok=True)

    try:
        check_is_fitted(featurizer)
    except NotFittedError:
        featurizer = clone(featurizer).fit(paths[:1])
    names = list(featurizer.get_feature_names_out())
    metadata = {"featurizer": {k: repr(v) for k, v in featurizer.get_params().items()},
                "feature_names": names, "source": str(source), "n_images": len(paths)}
    if hasattr(featurizer, "preprocessing_"):
        metadata["preprocessing"] = featurizer.preprocessing_.to_dict()
    runtime_only = {"verbose", "num_workers", "batch_size", "device", "memory"}
    config = {k: v for k, v in metadata["featurizer"].items() if k not in runtime_only}
    # weights=None means a random model per fit: parts are only reusable for the very same weights.
    config["weights_identity"] = weights_identity(featurizer.model_)
    config = json.dumps(config, sort_keys=True)

    from tqdm.auto import tqdm

    done = 0
    bar = tqdm(total=sum(len(chunks[i]) for i in mine), unit="img", disable=not verbose, desc="featurize")
    part_files = []
    for i in mine:
        chunk = chunks[i]
        part = os.path.join(parts_dir, f"part-{i:06d}-{_chunk_id(chunk, config)}.parquet")
        part_files.append(part)
        if resume and os.path.exists(part):
            bar.update(len(chunk))
            continue
        features = np.asarray(featurizer.transform(chunk), dtype=np.float32)
        frame = pd.DataFrame(features, columns=names)
        frame.insert(0, "path", chunk)
        _write_parquet(frame, part, metadata)
        done += len(chunk)
        bar.update(len(chunk))
    bar.close()

    frames = [pd.read_parquet(p) for p in part_files]
    result = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["path", *names])
    _write_parquet(result, target, {**metadata, "rank": env.rank, "world_size": env.world_size})
    for p in part_files:
        os.unlink(p)
    if not os.listdir(parts_dir):
        os.rmdir(parts_dir)
    return target
