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
    assert [r["weights"] for r in rows] == ["cached", "download"]


def test_info_bad_phi_is_a_clear_error(capsys):
    assert main(["info", "--phi", "b9"]) == 2
    assert "published name" in capsys.readouterr().err
