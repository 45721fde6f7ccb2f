"""``effsk demo`` runs the README's design-card pipeline (what README's "Set up" section says it runs)."""

import re
from pathlib import Path

from sklearn.base import BaseEstimator
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline

from effsk import EfficientNetFeaturizer
from effsk.cli import build_parser
from effsk.jobs.demo import demo_pipeline, run_demo

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
# The featurizer's settings that only change speed or output, not the features or the model.
_RUNTIME = {"batch_size", "verbose"}


def _plain_params(pipe) -> dict:
    return {name: value for name, value in pipe.get_params().items()
            if not isinstance(value, (BaseEstimator, list)) and name.rpartition("__")[2] not in _RUNTIME}


def test_the_demo_pipeline_is_the_readme_design_card_at_the_resolution_readme_states():
    block = re.search(r"^pipe = (Pipeline\(\[.*?\]\))\n", README, re.S | re.M).group(1)
    readme_pipe = eval(block, {"Pipeline": Pipeline, "EfficientNetFeaturizer": EfficientNetFeaturizer,
                               "LogisticRegression": LogisticRegression})
    default_resolution = build_parser().parse_args(["demo"]).resolution
    assert f"`resolution={default_resolution}`" in README.split("## The design card")[0]
    demo = demo_pipeline(resolution=readme_pipe.named_steps["feat"].resolution)
    assert [name for name, _ in demo.steps] == [name for name, _ in readme_pipe.steps] == ["feat", "clf"]
    assert _plain_params(demo) == _plain_params(readme_pipe)
    assert demo_pipeline().named_steps["feat"].resolution == default_resolution


def test_run_demo_prints_and_returns_its_scores():
    lines = []
    result = run_demo(0, None, n=40, resolution=32, batch_size=20, verbose=0, print_fn=lines.append)
    assert result["n_train"] == 30 and result["n_test"] == 10
    assert 0.0 <= result["accuracy"] <= 1.0 and 0.0 <= result["baseline_accuracy"] <= 1.0
    assert any(line.startswith("pipeline: Pipeline(steps=[('feat'") and "'clf'" in line for line in lines)
