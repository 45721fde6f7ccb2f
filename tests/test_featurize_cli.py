"""effsk featurize: parquet output keyed by path, resumable, one file per rank under torchrun."""

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from effsk.weights.checkpoint import save_checkpoint
from effsk.cli import main
from effsk.estimators import EfficientNetFeaturizer
from effsk.data.images import ImageLoadError
from effsk.jobs import featurize as featurize_module
from effsk.jobs.featurize import featurize_to_parquet, read_features
from effsk.weights import build_model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("feat")
    rng = np.random.default_rng(0)
    for i in range(10):
        sub = root / "images" / ("a" if i < 5 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(sub / f"{i}.png")
    model, pre = build_model(0, None, num_classes=0)
    ckpt = root / "b0.pt"
    save_checkpoint(ckpt, model, pre.with_resolution(32))
    return root, ckpt


def _featurizer(ckpt, **kw):
    return EfficientNetFeaturizer(0, weights=str(ckpt), resolution=32, batch_size=4, **kw)


def test_parquet_holds_features_keyed_by_path_with_config_metadata(setup, tmp_path):
    root, ckpt = setup
    out = tmp_path / "features.parquet"
    assert main(["featurize", str(root / "images"), str(out), "--phi", "0", "--weights", str(ckpt),
                 "--resolution", "32", "--chunk-size", "4", "--quiet"]) == 0
    df, meta = read_features(out)
    assert len(df) == 10 and df["path"].str.endswith(".png").all()
    names = meta["feature_names"]
    assert list(df.columns) == ["path", *names] and meta["preprocessing"]["crop_size"] == 32
    expected = _featurizer(ckpt).fit(list(df["path"])).transform(list(df["path"]))
    np.testing.assert_allclose(df[names].to_numpy(), expected, rtol=1e-5, atol=1e-6)
    assert not (tmp_path / "features.parquet.parts").exists()


def test_interrupted_run_resumes_without_redoing_finished_chunks(setup, tmp_path, monkeypatch):
    root, ckpt = setup
    out = tmp_path / "f.parquet"
    calls, killed = [], []
    original = EfficientNetFeaturizer.transform

    def flaky(self, X):
        calls.append(len(X))
        if len(calls) == 2 and not killed:
            killed.append(True)
            raise RuntimeError("killed")
        return original(self, X)

    monkeypatch.setattr(EfficientNetFeaturizer, "transform", flaky)
    with pytest.raises(RuntimeError, match="killed"):
        featurize_to_parquet(root / "images", out, featurizer=_featurizer(ckpt), chunk_size=4, verbose=0)
    assert not out.exists() and len(list((tmp_path / "f.parquet.parts").iterdir())) == 1
    calls.clear()
    featurize_to_parquet(root / "images", out, featurizer=_featurizer(ckpt), chunk_size=4, verbose=0)
    assert calls == [4, 2]  # chunk 0 was reused; chunks 1 and 2 computed
    df, _ = read_features(out)
    assert len(df) == 10
    # another configuration never reuses parts
    calls.clear()
    featurize_to_parquet(root / "images", out, featurizer=_featurizer(ckpt, pooling="max"), chunk_size=4, verbose=0)
    assert calls == [4, 4, 2]


def test_each_torchrun_rank_featurizes_its_shard(setup, tmp_path, monkeypatch):
    root, ckpt = setup
    out = tmp_path / "f.parquet"
    frames = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        written = featurize_to_parquet(root / "images", out, featurizer=_featurizer(ckpt), chunk_size=3, verbose=0)
        assert written.endswith(f".rank{rank:04d}-of-0002.parquet")
        frames.append(read_features(written)[0])
    assert len(frames[0]) == 6 and len(frames[1]) == 4  # chunks 0, 2 and 1, 3
    both = pd.concat(frames)
    assert sorted(both["path"]) == sorted(set(both["path"])) and len(both) == 10


def test_bad_source_is_a_clear_cli_error(tmp_path, capsys):
    assert main(["featurize", str(tmp_path / "nope"), str(tmp_path / "o.parquet"), "--weights", "none"]) == 2
    assert "neither a directory" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# --on-error: a corrupt and a missing file among good ones
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def flawed(setup, tmp_path_factory):
    """A table of 8 paths in chunks of 3: 6 good images, a corrupt file at row 4 and a missing one at row 6."""
    root, ckpt = setup
    good = sorted(str(p) for p in (root / "images").rglob("*.png"))[:6]
    folder = tmp_path_factory.mktemp("flawed")
    corrupt = folder / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    missing = folder / "missing.png"
    paths = [*good[:4], str(corrupt), good[4], str(missing), good[5]]
    table = folder / "images.csv"
    pd.DataFrame({"path": paths}).to_csv(table, index=False)
    reference = _featurizer(ckpt).fit().transform(good)  # each good image featurized in-process, independently
    return table, paths, {4: str(corrupt), 6: str(missing)}, reference


def _cli(table, out, ckpt, *extra):
    return main(["featurize", str(table), str(out), "--phi", "0", "--weights", str(ckpt), "--resolution", "32",
                 "--chunk-size", "3", "--quiet", *extra])


def _count_transforms(monkeypatch) -> list:
    calls, original = [], EfficientNetFeaturizer.transform
    monkeypatch.setattr(EfficientNetFeaturizer, "transform", lambda self, X: calls.append(list(X)) or original(self, X))
    return calls


def _killed_after(monkeypatch, n_chunks: int):
    """Make the job die after computing ``n_chunks`` chunks; return the function that heals it."""
    real, done = featurize_module.featurize_chunk, []

    def interrupted(*args):
        if len(done) == n_chunks:
            raise RuntimeError("killed")
        done.append(True)
        return real(*args)

    monkeypatch.setattr(featurize_module, "featurize_chunk", interrupted)
    return lambda: monkeypatch.setattr(featurize_module, "featurize_chunk", real)


@pytest.mark.parametrize("mode, listed_as", [("skip", "left out"), ("nan", "NaN rows")])
def test_skip_and_nan_keep_every_good_row_and_list_the_bad_files(setup, flawed, tmp_path, capsys, mode, listed_as):
    _, ckpt = setup
    table, paths, bad, reference = flawed
    out = tmp_path / "f.parquet"
    assert _cli(table, out, ckpt, "--on-error", mode) == 0
    df, meta = read_features(out)
    features = df[meta["feature_names"]].to_numpy()
    failed = np.isnan(features).all(axis=1)
    if mode == "skip":  # bad rows are left out
        assert list(df["path"]) == [p for i, p in enumerate(paths) if i not in bad] and not failed.any()
    else:  # every row, NaN where the file could not be read
        assert list(df["path"]) == paths and np.flatnonzero(failed).tolist() == sorted(bad)
    assert not np.isnan(features[~failed]).any()
    np.testing.assert_allclose(features[~failed], reference, rtol=1e-5, atol=1e-6)
    assert meta["on_error"] == mode and meta["failures"] == [
        {"index": 4, "path": bad[4], "reason": "not an image (unrecognised format)"},
        {"index": 6, "path": bad[6], "reason": "file not found"},
    ]
    err = capsys.readouterr().err
    assert f"2 of 8 images could not be read ({listed_as})" in err
    assert all(f"{f['path']}: {f['reason']}" in err for f in meta["failures"])


def test_a_stopped_run_resumes_with_skip_without_redoing_or_losing_rows(setup, flawed, tmp_path, capsys, monkeypatch):
    _, ckpt = setup
    table, paths, bad, reference = flawed
    chunks = [paths[0:3], paths[3:6], paths[6:]]
    out = tmp_path / "f.parquet"
    calls = _count_transforms(monkeypatch)
    assert _cli(table, out, ckpt) == 2  # the default stops at the corrupt file, naming its row and path
    assert f"image 4 ({bad[4]!r})" in capsys.readouterr().err and not out.exists()
    assert calls == chunks[:2]

    # Rerun with skip: chunk 0 comes from the stopped run; this run dies after chunk 1 (holding a failure).
    calls.clear()
    heal = _killed_after(monkeypatch, 1)
    with pytest.raises(RuntimeError, match="killed"):
        featurize_to_parquet(table, out, featurizer=_featurizer(ckpt), chunk_size=3, on_error="skip", verbose=0)
    heal()
    assert calls == [chunks[1]]

    # Resumed: only chunk 2 is computed; every good row appears once, both failures are listed once.
    calls.clear()
    featurize_to_parquet(table, out, featurizer=_featurizer(ckpt), chunk_size=3, on_error="skip", verbose=0)
    assert calls == [chunks[2]]
    df, meta = read_features(out)
    assert list(df["path"]) == [p for i, p in enumerate(paths) if i not in bad]
    np.testing.assert_allclose(df[meta["feature_names"]].to_numpy(), reference, rtol=1e-5, atol=1e-6)
    assert [f["index"] for f in meta["failures"]] == sorted(bad)


def test_a_raise_run_recomputes_a_part_holding_failures_and_raises(setup, flawed, tmp_path, monkeypatch):
    _, ckpt = setup
    table, paths, bad, _ = flawed
    out = tmp_path / "f.parquet"
    heal = _killed_after(monkeypatch, 2)
    with pytest.raises(RuntimeError, match="killed"):
        featurize_to_parquet(table, out, featurizer=_featurizer(ckpt), chunk_size=3, on_error="nan", verbose=0)
    heal()
    calls = _count_transforms(monkeypatch)
    with pytest.raises(ImageLoadError, match=r"image 4 \(.*corrupt.png"):
        featurize_to_parquet(table, out, featurizer=_featurizer(ckpt), chunk_size=3, on_error="raise", verbose=0)
    assert calls == [paths[3:6]]  # chunk 0 (clean) reused; chunk 1's NaN row cannot serve "raise"


def test_torchrun_and_dask_together_is_a_clear_cli_error(setup, tmp_path, monkeypatch, capsys):
    root, ckpt = setup
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["featurize", str(root / "images"), str(tmp_path / "o.parquet"), "--weights", str(ckpt),
                 "--dask", "tcp://127.0.0.1:1"]) == 2
    assert "either under torchrun" in capsys.readouterr().err and not (tmp_path / "o.parquet.parts").exists()
