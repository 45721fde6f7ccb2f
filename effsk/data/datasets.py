"""Where image collections come from: ImageFolder directories, globs, and CSV/parquet tables.

Every source resolves to plain lists (paths, and labels with their class names when labelled); the
images themselves are decoded later, in batches, by :mod:`effsk.data.images`.
"""

from __future__ import annotations

import glob as _glob
import os
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

__all__ = ["IMAGE_EXTENSIONS", "LabelledImages", "image_folder", "image_table", "list_images"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
TABLE_EXTENSIONS = (".csv", ".parquet", ".pq")


@dataclass
class LabelledImages:
    """Image paths with integer labels indexing ``classes``."""

    paths: list[str]
    labels: list[int]
    classes: list = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def image_folder(root, classes=None) -> LabelledImages:
    """An ImageFolder-style directory: one sub-directory per class, images inside (any depth).

    ``classes`` fixes the class order (e.g. a validation folder must use the training classes).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {str(root)!r} does not exist or is not a directory")
    found = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if classes is None:
        classes = found
    else:
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise ValueError(f"{str(root)!r} has class folders {unknown} that are not among the training classes {list(classes)}")
    index = {c: i for i, c in enumerate(classes)}
    paths, labels = [], []
    for cls in found:
        for dirpath, dirnames, filenames in os.walk(root / cls):
            dirnames.sort()
            for name in sorted(filenames):
                if _is_image(name):
                    paths.append(os.path.join(dirpath, name))
                    labels.append(index[cls])
    if not paths:
        raise ValueError(f"image folder {str(root)!r} holds no images ({', '.join(IMAGE_EXTENSIONS)}) in class sub-folders")
    return LabelledImages(paths, labels, list(classes))


def read_table(path) -> pd.DataFrame:
    """Read a CSV or parquet table."""
    path = str(path)
    if path.lower().endswith(".csv"):
        return pd.read_csv(path)
    if path.lower().endswith((".parquet", ".pq")):
        return pd.read_parquet(path)
    raise ValueError(f"table {path!r}: expected a .csv or .parquet file")


def _resolve_paths(values, base: str) -> list[str]:
    return [v if os.path.isabs(v) else os.path.join(base, v) for v in map(str, values)]


def image_table(path, path_column: str = "path", label_column: str | None = "label", classes=None) -> LabelledImages:
    """A CSV/parquet table with an image-path column and (optionally) a label column.

    Relative paths are taken relative to the table's directory.
    """
    table = read_table(path)
    for col in [path_column] + ([label_column] if label_column else []):
        if col not in table.columns:
            raise ValueError(f"table {str(path)!r} has no column {col!r}; its columns are {list(table.columns)}")
    base = os.path.dirname(os.path.abspath(str(path)))
    paths = _resolve_paths(table[path_column], base)
    if not label_column:
        return LabelledImages(paths, [], [])
    raw = table[label_column]
    if raw.isna().any():
        bad = int(raw.isna().to_numpy().nonzero()[0][0])
        raise ValueError(f"table {str(path)!r}: row {bad} has no {label_column!r} value")
    if classes is None:
        classes = sorted(raw.unique().tolist())
    index = {c: i for i, c in enumerate(classes)}
    missing = sorted(set(raw.unique().tolist()) - set(index), key=str)
    if missing:
        raise ValueError(f"table {str(path)!r}: labels {missing} are not among the training classes {list(classes)}")
    return LabelledImages(paths, [index[v] for v in raw], list(classes))


def list_images(source, path_column: str = "path") -> list[str]:
    """Image paths from a directory (recursive), a glob pattern, or a CSV/parquet path column.

    The order is deterministic (sorted for directories and globs, table order for tables).
    """
    source = str(source)
    if os.path.isdir(source):
        out = []
        for dirpath, dirnames, filenames in os.walk(source):
            dirnames.sort()
            out.extend(os.path.join(dirpath, n) for n in sorted(filenames) if _is_image(n))
        if not out:
            raise ValueError(f"directory {source!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        return out
    if source.lower().endswith(TABLE_EXTENSIONS) and os.path.isfile(source):
        return image_table(source, path_column=path_column, label_column=None).paths
    if _glob.has_magic(source):
        out = sorted(p for p in _glob.glob(source, recursive=True) if os.path.isfile(p))
        if not out:
            raise ValueError(f"glob {source!r} matches no files")
        return out
    raise FileNotFoundError(f"image source {source!r} is neither a directory, a .csv/.parquet table, nor a glob pattern that matches files")
