import json
import os
import subprocess
import sys

import pandas as pd
import pytest

from effsk.cli import main

REF_PARAMS = {"b0": 5_288_548, "b3": 12_233_232, "lite0": 4_652_008}

# --phi 2.5 is unpublished and must count with torch: the control that the check can see an import.
NO_TORCH_CHECK = (
    "import sys\n"
    "from effsk.cli import main\n"
    "assert main(['info']) == main(['info', '--phi', 'b3', '0', 'lite2', '--format', 'json']) == 0\n"
    "assert main(['info', '--format', 'csv']) == 0\n"
    "heavy = [m for m in ('torch', 'torchvision', 'pandas') if m in sys.modules]\n"
    "assert not heavy, heavy\n"
    "assert main(['info', '--phi', '2.5']) == 0 and 'torch' in sys.modules\n"
)


@pytest.fixture(scope="module", autouse=True)
def fresh_interpreter(tmp_path_factory):
    """A fresh interpreter (this one has imported torch), started when this module starts so that it
    runs on the second core while the tests below run here."""
    env = {**os.environ, "TORCH_HOME": str(tmp_path_factory.getbasetemp() / "torch_home")}  # as conftest's
    proc = subprocess.Popen([sys.executable, "-c", NO_TORCH_CHECK], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


def test_info_default_table_lists_whole_family(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for name in ["b0", "b7", "lite0", "lite4", "GFLOPs".lower(), "weights"]:
        assert name in out
    assert "5.29M" in out and "66.35M" in out


def test_info_csv_and_json_for_any_phi(capsys):
    assert main(["info", "--phi", "0", "0.5", "1", "2.5", "--scaling", "compound", "--format", "csv"]) == 0
    import io

    table = pd.read_csv(io.StringIO(capsys.readouterr().out))
    assert list(table["phi"]) == [0, 0.5, 1, 2.5]
    assert list(table["resolution"]) == [round(224 * 1.15**p) for p in (0, 0.5, 1, 2.5)]
    assert table["params"].is_monotonic_increasing
    assert main(["info", "--phi", "b0", "b3", "lite0", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["name"]: r["params"] for r in rows} == REF_PARAMS


def test_info_reports_locally_cached_weights(tmp_path, monkeypatch, capsys):
    from torchvision.models import EfficientNet_B0_Weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / EfficientNet_B0_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[1]).write_bytes(b"x")
    assert main(["info", "--phi", "b0", "b1", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    # every registered weights name of the variant, and those on this machine
    assert [r["weights"] for r in rows] == ["imagenet, tf_imagenet, advprop, noisy_student",
                                            "imagenet, imagenet_v2, tf_imagenet, advprop, noisy_student"]
    assert [r["on_machine"] for r in rows] == ["imagenet", "-"]


def test_info_bad_phi_is_a_clear_error(capsys):
    assert main(["info", "--phi", "b9"]) == 2
    assert "published name" in capsys.readouterr().err


def test_info_reads_published_counts_and_counts_only_the_rest(monkeypatch):
    import effsk.jobs.info as info

    counted = []
    gflops = info._counted_gflops
    monkeypatch.setattr(info, "_counted_gflops", lambda s, res: counted.append((s.label, res)) or gflops(s, res))
    rows = {row["name"]: row for row in info.family_table()}
    # REFERENCE.md: torchvision's params and GFLOPs at its eval crop, which is the variant's own resolution
    # for all but b2 (torchvision evaluates b2 at 288, not 260).
    ref_gflops = {"b0": 0.386, "b1": 0.687, "b3": 1.827, "b4": 4.394, "b5": 10.266, "b6": 19.068, "b7": 37.746}
    assert {name: rows[name]["gflops"] for name in ref_gflops} == ref_gflops
    assert {name: rows[name]["params"] for name in REF_PARAMS} == REF_PARAMS
    assert counted == []  # the published variants at their own resolution: nothing counted
    assert abs(rows["b2"]["gflops"] - 1.0) < 0.1  # paper Table 2: B2 1.0B at 260
    assert rows["lite3"]["weights"] == rows["lite3"]["on_machine"] == "-"
    assert rows["lite0"]["weights"] == "imagenet"
    # another resolution or an unpublished phi is counted: b2 at torchvision's 288 crop is its 1.088
    b2, phi = info.family_table(["b2", 1.5], resolution=288)
    assert counted == [("b2", 288), ("phi=1.5", 288)]
    assert abs(b2["gflops"] - 1.088) < 0.01 and b2["params"] == 9_109_994
    assert phi["params"] > REF_PARAMS["b0"] and phi["paper_top1"] is None


# REFERENCE.md: the TF reference's Lite parameters; the paper's (b0..b7) and the TF README's (Lite) top-1.
REF_LITE_PARAMS = {"lite0": 4_652_008, "lite1": 5_416_680, "lite2": 6_092_072, "lite3": 8_197_096,
                   "lite4": 13_006_568}
REF_TOP1 = {"b0": 77.1, "b1": 79.1, "b2": 80.1, "b3": 81.6, "b4": 82.9, "b5": 83.6, "b6": 84.0, "b7": 84.3,
            "lite0": 75.1, "lite1": 76.7, "lite2": 77.6, "lite3": 79.8, "lite4": 81.5}


def test_published_facts_equal_torchvision_reference_and_meta_counts():
    from torchvision.models import get_model_weights

    from effsk.jobs.info import PUBLISHED_FACTS
    from effsk.nn import count_macs, count_params
    from effsk.scaling import PUBLISHED

    assert list(PUBLISHED_FACTS) == list(PUBLISHED)
    assert {name: facts.paper_top1 for name, facts in PUBLISHED_FACTS.items()} == REF_TOP1
    for k in range(8):
        meta = get_model_weights(f"efficientnet_b{k}").IMAGENET1K_V1.meta
        assert PUBLISHED_FACTS[f"b{k}"].params == meta["num_params"]
        if k != 2:  # torchvision counts b2 at 288
            assert PUBLISHED_FACTS[f"b{k}"].gflops == meta["_ops"]
    for name, params in REF_LITE_PARAMS.items():
        assert PUBLISHED_FACTS[name].params == params == count_params(name)
    # nothing published at the variant's own resolution: effsk's count on the meta device
    for name in ["b2", *REF_LITE_PARAMS]:
        assert PUBLISHED_FACTS[name].gflops == round(count_macs(name) / 1e9, 3), name


def test_published_weights_equal_the_registry_and_its_view_of_this_machine():
    from effsk.jobs.info import _PUBLISHED_WEIGHTS, family_table
    from effsk.scaling import PUBLISHED
    from effsk.weights.registry import list_weights

    def location(entry):
        return getattr(entry.source, "distribution", None) or os.path.basename(entry.source.path)

    rows = {row["name"]: row for row in family_table()}
    for variant in PUBLISHED:
        entries = list_weights(variant)
        assert [(w.name, w.package or w.hub_file) for w in _PUBLISHED_WEIGHTS.get(variant, ())] == [
            (e.name, location(e)) for e in entries
        ], variant
        assert rows[variant]["on_machine"] == (", ".join(e.name for e in entries if e.source.local_file()) or "-")


@pytest.mark.parametrize("env", [{}, {"XDG_CACHE_HOME": "/xdg"}, {"TORCH_HOME": "~/th", "XDG_CACHE_HOME": "/xdg"}])
def test_weights_are_looked_up_in_torchs_hub_dir(env, monkeypatch):
    import torch

    from effsk.jobs.info import torch_hub_dir

    for name in ("TORCH_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert torch_hub_dir() == torch.hub.get_dir()


def test_info_for_published_names_imports_no_torch(fresh_interpreter):  # last: it ran beside the tests above
    stdout, stderr = fresh_interpreter.communicate(timeout=300)
    assert fresh_interpreter.returncode == 0, stderr
    assert stdout.count("lite2") == 3 and "phi=2.5" in stdout
