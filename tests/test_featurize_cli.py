"""effsk featurize: parquet output keyed by path, resumable, one file per rank under torchrun."""

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from effsk.weights.checkpoint import save_checkpoint
from effsk.cli import main
from effsk.estimators import EfficientNetFeaturizer
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
