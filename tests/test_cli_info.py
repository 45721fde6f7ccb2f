import json

import pandas as pd

from effsk.cli import main

REF_PARAMS = {"b0": 5_288_548, "b3": 12_233_232, "lite0": 4_652_008}


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


def test_info_reads_published_counts_and_counts_only_the_rest(monkeypatch, capsys):
    import effsk.jobs.info as info

    counted, counted_params = [], []
    macs, params = info.count_macs, info.count_params
    monkeypatch.setattr(info, "count_macs", lambda s, res: counted.append(s.label) or macs(s, res))
    monkeypatch.setattr(info, "count_params", lambda s: counted_params.append(s.label) or params(s))
    table = info.family_table()
    # REFERENCE.md: torchvision's params and GFLOPs at its eval crop, which is the variant's own resolution
    # for all but b2 (torchvision evaluates b2 at 288, not 260).
    ref_gflops = {"b0": 0.386, "b1": 0.687, "b3": 1.827, "b4": 4.394, "b5": 10.266, "b6": 19.068, "b7": 37.746}
    rows = table.set_index("name")
    assert rows.loc[list(ref_gflops), "gflops"].to_dict() == ref_gflops
    assert rows.loc[["b0", "b3", "lite0"], "params"].to_dict() == REF_PARAMS
    assert counted == ["b2", "lite0", "lite1", "lite2", "lite3", "lite4"]
    assert counted_params == ["lite3", "lite4"]  # no published weights: nothing to read
    assert abs(rows.loc["b2", "gflops"] - 1.0) < 0.1  # paper Table 2: B2 1.0B at 260
    assert rows.loc["lite3", "weights"] == rows.loc["lite3", "on_machine"] == "-"
    assert rows.loc["lite0", "weights"] == "imagenet"
