"""examples/: every script runs offline with its tiny settings, and what it prints is checked against
references computed here with scikit-learn alone (a raw-pixel logistic regression, chance).

``pipeline.py`` runs as a user runs it (``python examples/pipeline.py ...`` from the repository root,
in a subprocess with one thread and passive OpenMP waiting), started when this module starts so that
it runs on the second core while the others run in-process through their ``main(argv)``, which saves
an interpreter and a torch import each.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

ROOT = Path(__file__).resolve().parents[1]
ACCURACY = r"([01]\.\d{4})"


class ExampleRun:
    """``python examples/<name> <args>`` started in the background; ``output()`` waits for what it printed."""

    def __init__(self, name: str, args: list[str], tmp_path: Path):
        env = dict(os.environ)
        env.update(OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
        # `python examples/x.py` puts examples/ first on sys.path: make `import effsk` find this checkout.
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
        env["TMPDIR"] = str(tmp_path)  # the scripts' temporary folders
        self.name, self.tmp_path = name, tmp_path
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "examples" / name), *args], cwd=ROOT, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def output(self) -> str:
        stdout, stderr = self.proc.communicate(timeout=300)
        assert self.proc.returncode == 0, f"{self.name} failed ({self.proc.returncode}):\n{stdout}\n{stderr}"
        _assert_cleaned_up(self.name, self.tmp_path)
        return stdout

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


@pytest.fixture(scope="module", autouse=True)
def pipeline_run(tmp_path_factory):
    run = ExampleRun("pipeline.py", ["--n", "100", "--resolution", "32"], tmp_path_factory.mktemp("pipeline"))
    yield run
    run.stop()


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{Path(name).stem}", ROOT / "examples" / name)
    module = importlib.util.module_from_spec(spec)
    saved = dict(os.environ)
    try:
        spec.loader.exec_module(module)
    finally:  # the scripts set OpenMP/OpenBLAS defaults when imported: keep them out of later tests
        os.environ.clear()
        os.environ.update(saved)
    return module


def run_main(name: str, args: list[str], tmp_path: Path, capsys, monkeypatch):
    """``examples/<name>``'s ``main(args)`` in this process: (its return value, what it printed)."""
    module = _load(name)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the scripts' temporary folders
    capsys.readouterr()
    result = module.main(args)
    _assert_cleaned_up(name, tmp_path)
    return result, capsys.readouterr().out


def _assert_cleaned_up(name: str, tmp_path: Path) -> None:
    # the scripts' temporary images, feature caches and checkpoints (folders named effsk-*) are removed
    left = [p.name for p in tmp_path.iterdir() if p.name.startswith("effsk-")]
    assert left == [], f"{name} left {left} behind"


def printed(pattern: str, output: str) -> list[float]:
    found = [float(x) for x in re.findall(pattern, output, flags=re.MULTILINE)]
    assert found, f"no line matches {pattern!r} in:\n{output}"
    return found


def chance(y_train, y_test) -> float:
    """Accuracy of always predicting the commonest training label."""
    values, counts = np.unique(y_train, return_counts=True)
    return float(np.mean(np.asarray(y_test) == values[counts.argmax()]))


def digits_split(n: int, test_size: float, seed: int = 0):
    """The examples' stratified split of the first n digits, on scikit-learn's own 8x8 pixels:
    ``(pixels_train, pixels_test, y_train, y_test)``."""
    digits = load_digits()
    pixels, y = digits.data[:n], digits.target[:n]
    return train_test_split(pixels, y, test_size=test_size, stratify=y, random_state=seed)


def raw_pixel_accuracy(n: int, test_size: float, seed: int = 0) -> float:
    p_train, p_test, y_train, y_test = digits_split(n, test_size, seed)
    return LogisticRegression(max_iter=1000).fit(p_train, y_train).score(p_test, y_test)


def test_grid_search_phi(tmp_path, capsys, monkeypatch):
    from effsk.weights import imagenet_weights_status

    phis = ["lite0", "lite1"]
    search, out = run_main("grid_search_phi.py", ["--n", "60", "--phis", *phis, "--resolutions", "32", "--cv", "2"],
                           tmp_path, capsys, monkeypatch)
    present = [phi for phi in phis if imagenet_weights_status(phi).startswith("installed")]
    rows = re.findall(r"^(lite\d) +32 +\d+\.\d\dM +\d+ +" + ACCURACY + r" +\d\.\d{4} +\d+\.\d\d +(\d)$", out, re.M)
    assert sorted(phi for phi, _, _ in rows) == sorted(present), out
    assert sorted(int(rank) for _, _, rank in rows)[0] == 1
    for phi, mean, _ in rows:
        assert float(mean) == pytest.approx(search.cv_results_["mean_test_score"][search.cv_results_["param_feat__phi"] == phi][0], abs=5e-5)
    (held_out,) = printed(r"^held-out test accuracy of the refitted best pipeline: " + ACCURACY + "$", out)
    _, _, y_train, y_test = digits_split(60, 0.25)
    assert held_out > chance(y_train, y_test) + 0.3


def test_tabular_plus_image(tmp_path, capsys, monkeypatch):
    scores, out = run_main("tabular_plus_image.py", ["--n", "60", "--resolution", "32"], tmp_path, capsys, monkeypatch)
    for name, score in scores.items():
        assert printed(rf"^{re.escape(name)} +" + ACCURACY + "$", out) == [round(score, 4)]
    # 1280 image features plus the 3 scaled numeric columns reach the classifier
    assert "1283 columns into LogisticRegression: image__effsk_lite0_avg_0," in out
    assert "numeric__ink, numeric__sensor_x, numeric__sensor_y" in out

    # the tabular-only number, recomputed with scikit-learn alone from the same table and split
    example = _load("tabular_plus_image.py")
    frame, y = example.write_table(str(tmp_path), 60, noise=0.35, seed=0)
    train, test, y_train, y_test = train_test_split(frame[example.NUMERIC], y, test_size=0.3, stratify=y, random_state=0)
    tabular = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(train, y_train).score(test, y_test)
    image, numeric, _ = scores.values()
    assert numeric == pytest.approx(tabular, abs=1e-12)
    assert image > chance(y_train, y_test) + 0.3, scores  # measured 0.61; chance 0.11


def test_fine_tune(tmp_path, capsys, monkeypatch):
    scores, out = run_main(
        "fine_tune.py", ["--n", "150", "--epochs", "2", "--resolution", "64", "--freeze", "backbone", "auto"],
        tmp_path, capsys, monkeypatch,
    )
    assert printed(r"^freeze='backbone': test accuracy " + ACCURACY, out) == [round(scores["backbone"], 4)]
    assert printed(r"^freeze='auto': test accuracy " + ACCURACY, out) == [round(scores["auto"], 4)]
    phases = re.findall(r"^ +\d +(head|train) +\d+\.\d{4} +\d+\.\d{4} +" + ACCURACY, out, re.M)
    # freeze="backbone" trains the head for both epochs; "auto" trains it alone first, then everything
    assert [phase for phase, _ in phases] == ["train", "train", "head", "train"]
    # a linear head on ImageNet features learns digits; two epochs of 95 images are too few to
    # assert the same of "auto", whose full-network epoch first costs accuracy (measured 0.24-0.40)
    _, _, y_train, y_test = digits_split(150, 0.3)
    assert scores["backbone"] > chance(y_train, y_test) + 0.3, scores  # measured 0.56-0.64; chance 0.09


def test_pretrain_then_featurize(tmp_path, capsys, monkeypatch):
    result, out = run_main("pretrain_then_featurize.py", ["--n", "200", "--epochs", "1", "--labels", "3"],
                           tmp_path, capsys, monkeypatch)
    assert re.search(r"^pretrained b0 for 1 epochs in ", out, re.M)
    assert "featurizer from the checkpoint: b0, 16 px, 1280 features" in out
    epochs = re.findall(r"^ +0 +\d+\.\d{4} +\d+\.\d{4} +" + ACCURACY, out, re.M)
    assert len(epochs) == 1 and float(epochs[0]) == round(result["history"][0]["val_top1"], 4)
    (row,) = re.findall(r"^ +3 +(\d+) +" + ACCURACY + " +" + ACCURACY + "$", out, re.M)
    assert int(row[0]) == 80 - 30  # 40% of 200 digits are "new"; 3 labels x 10 classes train on them
    (scores,) = result["rows"]
    assert [float(row[1]), float(row[2])] == [round(scores["pretrained"], 4), round(scores["random init"], 4)]
    # random convolutional features of digits are a strong baseline (the example's point); one epoch of
    # pretraining on 108 images is not enough to beat it, so only the baseline is held to a margin
    assert scores["random init"] > 0.1 + 0.4, scores  # 10 balanced classes: chance 0.1; measured 0.80


def test_pipeline(pipeline_run):  # last: the script has run alongside the tests above
    out = pipeline_run.output()
    assert "features: 1280 per image from lite0 at 32px, weights='imagenet'" in out
    (features,) = printed(r"^test accuracy, EfficientNet features \+ LogisticRegression: +" + ACCURACY + "$", out)
    (baseline,) = printed(r"^test accuracy, raw 8x8 pixels \+ LogisticRegression: +" + ACCURACY + "$", out)
    # the baseline's number, recomputed here with scikit-learn alone from the same split
    assert baseline == pytest.approx(raw_pixel_accuracy(100, 0.25), abs=5e-5)
    _, _, y_train, y_test = digits_split(100, 0.25)
    assert features > chance(y_train, y_test) + 0.4, (features, baseline)
