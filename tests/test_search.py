"""effsk.search_coefficients: the paper's step 1 (grid search of alpha, beta, gamma at phi = 1)
on tiny synthetic data; constraint, table shape and configs checked against the paper's formulas."""

import itertools
import subprocess
import sys

import numpy as np
import pytest
import torch
from synthetic import tinted_images

from effsk.nn import build, count_macs, count_params
from effsk import search_coefficients
from effsk.scaling import resolve
from effsk.training.search import DEFAULT_GRID, Coefficients, _candidates, candidate_scaling

COLUMNS = ["alpha", "beta", "gamma", "constraint", "depth", "width", "resolution", "params", "macs",
           "train_loss", "val_loss", "val_score", "train_seconds"]
GRID = [(1.2, 1.1, 1.15), (2.0, 1.0, 1.0), (1.0, 1.0, 1.4)]
BASE = dict(base_resolution=16, base_width=0.25, base_depth=0.25)


def _data(n=30):
    X, y = tinted_images(n, n_classes=3, size=16, seed=1)
    return X, np.array(["red", "green", "blue"])[y]  # string labels: the search encodes them


def _search(**kw):
    X, y = _data()
    settings = dict(arch="efficientnet", grid=GRID, max_epochs=1, batch_size=8, validation_fraction=0.3,
                    train_config={"device": "cpu", "lr": 3e-3}, random_state=0, **BASE)
    return search_coefficients(X, y, **{**settings, **kw})


@pytest.fixture(scope="module")
def searched():
    # One torch thread, as in each n_jobs=2 worker: the parallel run must then match exactly.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rng_before = torch.get_rng_state()
        result = _search()
        assert torch.get_num_threads() == 1
        yield result, rng_before
    finally:
        torch.set_num_threads(threads)


def test_table_is_ranked_and_respects_the_constraint(searched):
    result, rng_before = searched
    table = result.results_
    assert list(table.columns) == COLUMNS
    assert list(table.index) == [1, 2, 3] and table.index.name == "rank"
    assert sorted(map(tuple, table[["alpha", "beta", "gamma"]].values.tolist())) == sorted(GRID)
    for _, row in table.iterrows():
        a, b, g = row["alpha"], row["beta"], row["gamma"]
        assert row["constraint"] == pytest.approx(a * b**2 * g**2)
        assert abs(row["constraint"] - 2) <= 0.1
        # phi = 1 of the shrunk base: depth/width multipliers times the bases, input round(16 * gamma)
        assert row["depth"] == pytest.approx(0.25 * a) and row["width"] == pytest.approx(0.25 * b)
        assert row["resolution"] == round(16 * g)
        assert 0 <= row["val_score"] <= 1 and np.isfinite(row["val_loss"]) and row["train_seconds"] > 0
    # ranked: val_score descending, val_loss ascending among ties
    keys = list(zip(-table["val_score"], table["val_loss"]))
    assert keys == sorted(keys)
    assert result.best_ == tuple(table.iloc[0][["alpha", "beta", "gamma"]])
    assert result.best_score_ == table.iloc[0]["val_score"]
    # candidates ran in this process: its RNG is as it was
    assert torch.equal(torch.get_rng_state(), rng_before)


def test_table_costs_are_the_candidates_models(searched):
    table = searched[0].results_
    by_alpha = table.set_index("alpha")
    # alpha=2 doubles the depth multiplier at the same width and input: more params and MACs
    assert by_alpha.loc[2.0, "params"] > by_alpha.loc[1.0, "params"]
    # gamma only changes the input: same params, MACs grow with the pixel count
    assert by_alpha.loc[1.0, "params"] == count_params(
        build("efficientnet", candidate_scaling("efficientnet", Coefficients(1.0, 1.0, 1.0), **BASE), num_classes=3)
    )
    with torch.device("meta"):
        model = build("efficientnet", candidate_scaling("efficientnet", Coefficients(1.0, 1.0, 1.4), **BASE),
                      num_classes=3)
    assert by_alpha.loc[1.0, "macs"] == count_macs(model, resolution=22)


@pytest.mark.parametrize("arch", ["efficientnet", "resnet50", "mobilenet_v2", "mobilenet_v1"])
def test_candidate_is_the_phi1_compound_model(arch):
    """With a full-size base, a candidate is build(arch, 1, scaling="compound", alpha, beta, gamma)."""
    c = Coefficients(1.2, 1.1, 1.15)
    expected = resolve(1, scaling="compound", alpha=1.2, beta=1.1, gamma=1.15, arch=arch)
    got = candidate_scaling(arch, c, base_resolution=224)
    assert got == expected
    assert got.resolution == round(224 * 1.15)


def test_parallel_search_gives_the_same_table(searched):
    """Workers run one torch thread each, like the serial fixture: same data, seeds, table."""
    serial = searched[0].results_.drop(columns="train_seconds")
    parallel = _search(n_jobs=2).results_.drop(columns="train_seconds")
    assert parallel.equals(serial)


def test_default_grid_is_the_feasible_part_of_its_product():
    expected = [t for t in itertools.product(*DEFAULT_GRID.values()) if abs(t[0] * t[1] ** 2 * t[2] ** 2 - 2) <= 0.1]
    assert len(expected) == 20
    assert (1.2, 1.1, 1.2) in expected and (2.0, 1.0, 1.0) in expected


@pytest.mark.parametrize(
    "grid, tolerance, message",
    [
        ({"alpha": [1.0, 1.1], "beta": [1.0], "gamma": [1.0]}, 0.1, r"the closest is \(1.1, 1.0, 1.0\) with 1.1000"),
        ([(1.2, 1.1, 1.15), (1.5, 1.1, 1.1)], 0.1, r"grid\[1\]=\(1.5, 1.1, 1.1\) has alpha \* beta\*\*2"),
        ([(1.2, 1.1, 1.15)], 0.05, "more than tolerance=0.05 away from 2"),
        ([(2.0, 1.0, 1.0), (2.0, 1.0, 1.0)], 0.1, r"grid\[1\]=\(2.0, 1.0, 1.0\) repeats grid\[0\]"),
        ([(0.9, 1.5, 1.1)], 0.1, r"grid\[0\].alpha=0.9 is not valid"),
        ([(2.0, 1.0)], 0.1, r"grid\[0\]=\(2.0, 1.0\) is not valid"),
        ({"alpha": [2.0], "beta": [1.0]}, 0.1, "needs exactly 'alpha', 'beta', 'gamma'"),
        ({"alpha": [2.0], "beta": [], "gamma": [1.0]}, 0.1, r"grid\['beta'\] is empty"),
        ([], 0.1, "grid is empty"),
    ],
)
def test_bad_or_infeasible_grids_raise_before_training(grid, tolerance, message):
    X, y = _data(6)
    with pytest.raises(ValueError, match=message):
        search_coefficients(X, y, grid=grid, tolerance=tolerance)


def test_grid_mapping_keeps_only_feasible_triples():
    grid = {"alpha": [2.0, 1.0], "beta": [1.0, 1.4], "gamma": [1.4, 1.0]}
    expected = [(a, b, g) for a, b, g in itertools.product([1.0, 2.0], [1.0, 1.4], [1.0, 1.4])
                if abs(a * b * b * g * g - 2) <= 0.05]
    assert expected == [(1.0, 1.0, 1.4), (1.0, 1.4, 1.0), (2.0, 1.0, 1.0)]
    assert _candidates(grid, 0.05) == expected


def test_too_few_images_per_class_for_the_split():
    X, y = _data(6)
    with pytest.raises(ValueError, match="cannot hold out validation_fraction=0.5 of 4 images stratified"):
        search_coefficients(X[:4], y[:4], grid=[(2.0, 1.0, 1.0)], validation_fraction=0.5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(train_config={"max_epochs": 3}), "use max_epochs= for the budget"),
        (dict(train_config={"seed": 1}), "random_state= for the seed"),
        (dict(train_config={"learning_rate": 0.1}), r"train_config\['learning_rate'\] is not a TrainConfig field"),
        (dict(arch="vgg16"), r"'arch' parameter of search_coefficients must be a str among .*Got 'vgg16'"),
        (dict(base_resolution=0), r"'base_resolution' parameter of search_coefficients must be an int in the range \[1, inf\)"),
        (dict(augment="heavy"), r"'augment' parameter of search_coefficients must be a str among .*Got 'heavy'"),
        (dict(validation_fraction=1.0), r"'validation_fraction' parameter .* range \(0\.0, 1\.0\)\. Got 1\.0"),
        (dict(base_width=float("inf")), r"'base_width' parameter .* Got inf"),
        (dict(y=np.zeros(6)), "y has 1 class"),
        (dict(y=np.arange(5) % 2), "X has 6 images but y has 5 labels"),
    ],
)
def test_bad_settings_are_named(kwargs, message):
    X, y = _data(6)
    y = kwargs.pop("y", y)
    with pytest.raises(ValueError, match=message):
        search_coefficients(X, y, grid=[(2.0, 1.0, 1.0)], **kwargs)


def test_scaling_module_stays_free_of_torch():
    code = "import sys, effsk.scaling; print(sorted(m for m in ('torch', 'effsk.training.search') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    import effsk
    import effsk.training.search

    assert effsk.search_coefficients is effsk.training.search.search_coefficients
