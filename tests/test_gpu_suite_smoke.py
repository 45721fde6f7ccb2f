"""benchmarks/gpu_suite.py stays alive: ``--device cpu --smoke`` runs every row on the CPU in seconds, writes
its CSV and markdown table, and a broken row is reported in the table and the exit code, not a crash.

The smoke run goes through the script's ``main(argv)`` in this process (torch, torchvision and timm
are imported already), with one torch thread as the test process has by default."""

import csv
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_suite.py"
SECTIONS = {"featurize tensors": 9, "featurize JPEG files": 4, "fine-tune": 2}  # rows per section


@pytest.fixture(scope="module")
def suite_module():
    spec = importlib.util.spec_from_file_location("gpu_suite", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_smoke_run_writes_every_row(suite_module, tmp_path, capsys):
    returncode = suite_module.main(["--device", "cpu", "--smoke", "--out", str(tmp_path)])
    printed = capsys.readouterr()
    assert returncode == 0, printed.out[-3000:] + printed.err[-3000:]
    with open(tmp_path / "gpu_suite.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert {s: sum(r["section"] == s for r in rows) for s in SECTIONS} == SECTIONS
    assert {r["model"] for r in rows} == {"B0@32", "B3@40", "B7@32"}
    for r in rows:
        if r["row"].startswith("timm") and r["status"].startswith("skipped"):
            assert r["status"] == "skipped: timm is not installed"
            continue
        assert r["status"] == "ok" and float(r["img_per_s"]) > 0, r
        assert float(r["vs_torchvision"]) > 0, r
    references = [r for r in rows if r["row"].startswith(("torchvision", "plain torchvision"))]
    assert len(references) == 5 and all(float(r["vs_torchvision"]) == 1.0 for r in references)
    checks = [r["note"] for r in rows if r["row"] == "effsk optimize_for_inference"]
    assert len(checks) == 3 and all(n.startswith("fp32 features vs torchvision: max rel diff") for n in checks)
    table = (tmp_path / "gpu_suite.md").read_text()
    assert table.count("\n| featurize tensors |") == 9 and table in printed.out
    jpeg_notes = [r["note"] for r in rows if r["row"].startswith("effsk EfficientNetFeaturizer")]
    assert [note.split(",")[0] for note in jpeg_notes] == ["decode='cpu' -> cpu", "decode='auto' -> cpu"], jpeg_notes
    assert "15 rows, 0 failed" in printed.out


def test_a_failing_row_is_reported_and_fails_the_exit_code(suite_module, tmp_path, monkeypatch, capsys):
    module = suite_module

    def sections(suite, spec, *args):
        suite.run(module.FINETUNE, spec, "plain torchvision AMP loop, channels_last", lambda: (100.0, ""))
        suite.run(module.FINETUNE, spec, "effsk EfficientNetClassifier.fit", broken)
        suite.run(module.FINETUNE, spec, "timm", skipped)

    def broken():
        raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore lines")

    def skipped():
        raise module.SkipRow("timm is not installed")

    for name in ("featurize_tensors", "featurize_jpeg_files"):
        monkeypatch.setattr(module, name, lambda *args: None)
    monkeypatch.setattr(module, "fine_tune", sections)
    assert module.main(["--device", "cpu", "--smoke", "--out", str(tmp_path)]) == 1
    with open(tmp_path / "gpu_suite.csv") as fh:
        saved = list(csv.DictReader(fh))
    assert [r["status"] for r in saved] == [
        "ok", "FAILED: RuntimeError: CUDA error: an illegal memory access was encountered", "skipped: timm is not installed"]
    assert saved[0]["vs_torchvision"] == "1.0" and saved[1]["img_per_s"] == ""
    captured = capsys.readouterr()
    assert "illegal memory access" in captured.err and "3 rows, 1 failed" in captured.out  # the traceback is logged

    late = module.Suite(module.resolve_device("cpu"), None, module.SMOKE, 0, 0.0, tmp_path / "late")
    late.run(module.FINETUNE, module.SMOKE.finetune, "effsk EfficientNetClassifier.fit", broken)
    assert late.rows[0].status == "skipped: time budget spent" and late.rows[0].img_per_s is None
