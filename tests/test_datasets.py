import os

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from effsk.data.datasets import image_folder, image_table, list_images
from effsk.utils.fileio import atomic_write
from effsk.training.runlog import RunLog


def _write(path, color):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), color, np.uint8)).save(path)


@pytest.fixture
def folder(tmp_path):
    for cls, n in (("cat", 2), ("dog", 3)):
        for i in range(n):
            _write(tmp_path / "train" / cls / f"{i}.png", 10 * i)
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    return tmp_path / "train"


def test_image_folder_lists_classes_and_labels(folder):
    data = image_folder(folder)
    assert data.classes == ["cat", "dog"]
    assert data.labels == [0, 0, 1, 1, 1]
    assert all(p.endswith(".png") for p in data.paths)
    with pytest.raises(ValueError, match="not among the training classes"):
        image_folder(folder, classes=["cat"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        image_folder(folder / "missing")


def test_image_table_csv_and_parquet_with_relative_paths(folder, tmp_path):
    rel = [os.path.relpath(p, tmp_path) for p in image_folder(folder).paths]
    df = pd.DataFrame({"file": rel, "y": ["a", "a", "b", "b", "b"]})
    df.to_csv(tmp_path / "t.csv", index=False)
    df.to_parquet(tmp_path / "t.parquet")
    for name in ("t.csv", "t.parquet"):
        data = image_table(tmp_path / name, path_column="file", label_column="y")
        assert data.classes == ["a", "b"] and data.labels == [0, 0, 1, 1, 1]
        assert all(os.path.isfile(p) for p in data.paths)
    with pytest.raises(ValueError, match="no column 'path'"):
        image_table(tmp_path / "t.csv")


def test_list_images_from_directory_glob_and_table(folder, tmp_path):
    from_dir = list_images(folder)
    assert len(from_dir) == 5
    assert list_images(str(folder / "*" / "*.png")) == from_dir
    pd.DataFrame({"path": from_dir[:2]}).to_csv(tmp_path / "p.csv", index=False)
    assert list_images(tmp_path / "p.csv") == from_dir[:2]
    with pytest.raises(FileNotFoundError, match="neither a directory"):
        list_images(tmp_path / "nothing")


def test_atomic_write_leaves_target_untouched_on_failure(tmp_path):
    target = tmp_path / "file.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_write(target) as fh:
            fh.write(b"half")
            raise RuntimeError("killed")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["file.bin"]
    with atomic_write(target) as fh:
        fh.write(b"new")
    assert target.read_bytes() == b"new"


def test_runlog_appends_truncates_and_plots(tmp_path):
    log = RunLog(tmp_path)
    for epoch in (1, 2, 3):
        log.append({"epoch": epoch, "train_loss": 1.0 / epoch, "val_top1": 0.1 * epoch, "lr": 0.1})
    assert [r["epoch"] for r in pd.read_csv(log.csv).to_dict("records")] == [1, 2, 3]
    log.truncate_after(2)
    assert [r["epoch"] for r in log.records()] == [1, 2]
    png = log.plot()
    assert Image.open(png).format == "PNG"
