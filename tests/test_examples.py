"""Smoke test of examples/: every script runs offline with tiny settings and prints its results.

Each script runs as a user runs it (``python examples/<name>.py ...`` from the repository root) in a
subprocess with one thread and passive OpenMP waiting, so that it neither competes with nor stalls
behind other jobs on a small machine.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ACCURACY = r"([01]\.\d{4})"


def run_example(name: str, args: list[str], tmp_path: Path) -> str:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    # `python examples/x.py` puts examples/ first on sys.path: make `import effsk` find this checkout.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env["TMPDIR"] = str(tmp_path)  # the scripts' temporary folders
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name), *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, f"{name} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    # the scripts' temporary images, feature caches and checkpoints (folders named effsk-*) are removed
    left = [p.name for p in tmp_path.iterdir() if p.name.startswith("effsk-")]
    assert left == [], f"{name} left {left} behind"
    return proc.stdout


def accuracies(pattern: str, output: str) -> list[float]:
    found = [float(x) for x in re.findall(pattern, output, flags=re.MULTILINE)]
    assert found, f"no line matches {pattern!r} in:\n{output}"
    assert all(0.0 <= x <= 1.0 for x in found), found
    return found


def test_pipeline(tmp_path):
    out = run_example("pipeline.py", ["--n", "100", "--resolution", "32"], tmp_path)
    assert "features: 1280 per image from lite0 at 32px, weights='imagenet'" in out
    accuracies(r"^test accuracy, EfficientNet features \+ LogisticRegression: +" + ACCURACY + "$", out)
    (baseline,) = accuracies(r"^test accuracy, raw 8x8 pixels \+ LogisticRegression: +" + ACCURACY + "$", out)

    # the baseline's number, recomputed here with scikit-learn alone from the same split
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    pixels, y = digits.data[:100], digits.target[:100]
    p_train, p_test, y_train, y_test = train_test_split(pixels, y, test_size=0.25, stratify=y, random_state=0)
    expected = LogisticRegression(max_iter=1000).fit(p_train, y_train).score(p_test, y_test)
    assert baseline == pytest.approx(expected, abs=5e-5)


def test_grid_search_phi(tmp_path):
    from effsk.weights import imagenet_weights_status

    phis = ["lite0", "lite1"]
    out = run_example(
        "grid_search_phi.py", ["--n", "60", "--phis", *phis, "--resolutions", "32", "--cv", "2"], tmp_path
    )
    present = [phi for phi in phis if imagenet_weights_status(phi).startswith("installed")]
    rows = re.findall(r"^(lite\d) +32 +\d+\.\d\dM +\d+ +" + ACCURACY + r" +\d\.\d{4} +\d+\.\d\d +(\d)$", out, re.M)
    assert sorted(phi for phi, _, _ in rows) == sorted(present), out
    assert min(int(rank) for _, _, rank in rows) == 1
    accuracies(r"^held-out test accuracy of the refitted best pipeline: " + ACCURACY + "$", out)


def test_tabular_plus_image(tmp_path):
    out = run_example("tabular_plus_image.py", ["--n", "60", "--resolution", "32"], tmp_path)
    scores = {
        name: accuracies(rf"^{re.escape(name)} +" + ACCURACY + "$", out)[0]
        for name in (
            "image only (EfficientNet features)",
            "tabular only (ink, sensor_x, sensor_y)",
            "image + tabular (ColumnTransformer)",
        )
    }
    assert len(scores) == 3
    # 1280 image features plus the 3 scaled numeric columns reach the classifier
    assert "1283 columns into LogisticRegression: image__effsk_lite0_avg_0," in out
    assert "numeric__ink, numeric__sensor_x, numeric__sensor_y" in out


def test_fine_tune(tmp_path):
    out = run_example(
        "fine_tune.py", ["--n", "150", "--epochs", "2", "--resolution", "32", "--freeze", "backbone", "auto"], tmp_path
    )
    backbone = accuracies(r"^freeze='backbone': test accuracy " + ACCURACY, out)
    auto = accuracies(r"^freeze='auto': test accuracy " + ACCURACY, out)
    assert len(backbone) == len(auto) == 1
    phases = re.findall(r"^ +\d +(head|train) +\d+\.\d{4} +\d+\.\d{4} +" + ACCURACY, out, re.M)
    # freeze="backbone" trains the head for both epochs; "auto" trains it alone first, then everything
    assert [phase for phase, _ in phases] == ["train", "train", "head", "train"]


def test_pretrain_then_featurize(tmp_path):
    out = run_example("pretrain_then_featurize.py", ["--n", "200", "--epochs", "1", "--labels", "3"], tmp_path)
    assert re.search(r"^pretrained b0 for 1 epochs in ", out, re.M)
    assert "featurizer from the checkpoint: b0, 16 px, 1280 features" in out
    epochs = re.findall(r"^ +0 +\d+\.\d{4} +\d+\.\d{4} +" + ACCURACY, out, re.M)
    assert len(epochs) == 1
    (row,) = re.findall(r"^ +3 +(\d+) +" + ACCURACY + " +" + ACCURACY + "$", out, re.M)
    assert int(row[0]) == 80 - 30  # 40% of 200 digits are "new"; 3 labels x 10 classes train on them
