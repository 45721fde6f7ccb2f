"""Every code block of README.md runs: python blocks in one namespace, shell lines as commands, all in
document order in one scratch directory. The set-up block is what CI (.ci/run) executes.

An ``effsk ...`` line runs through ``effsk.cli.main`` in this process (the same argument parsing and
jobs, without a torch import per line); the ``torchrun`` line starts its processes, and with them
``python -m effsk``, as a user's shell does.

Each python block and each shell line is its own test, so that no single test runs for long and a
failure names its section. Running one of them alone (``-k``) first runs the blocks before it. What
a block prints or writes is checked against references computed here (chance, torchvision's own
networks and metadata, the files a command must write), never against numbers effsk printed before.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"^```(\w+)\n(.*?)^```", re.S | re.M)
HEADING = re.compile(r"^## (.+)$", re.M)


def _blocks() -> list[tuple[str, str, str]]:
    """``(section, language, code)`` of every fenced block, in document order."""
    text = (ROOT / "README.md").read_text()
    headings = [(m.start(), m.group(1)) for m in HEADING.finditer(text)]
    blocks = []
    for m in BLOCK.finditer(text):
        section = max(((pos, title) for pos, title in headings if pos < m.start()), default=(0, "top"))[1]
        blocks.append((section, m.group(1), m.group(2)))
    return blocks


def _steps() -> list[tuple[str, str, str]]:
    """``(id, language, code)``: each python block after the set-up, and each line of a shell block."""
    steps = []
    for section, lang, code in _blocks()[1:]:
        slug = re.sub(r"[^a-z0-9]+", "-", section.lower()).strip("-")
        if lang == "bash":
            lines = [ln.strip() for ln in code.splitlines() if ln.strip()]
            steps += [(f"{slug}-{shlex.split(ln)[0]}-{i}", lang, ln) for i, ln in enumerate(lines)]
        else:
            steps.append((f"{slug}-{lang}", lang, code))
    return steps


STEPS = _steps()


def _words(line: str) -> list[str]:
    words = shlex.split(line.split("  #")[0])
    if words[0] not in ("effsk", "torchrun"):
        raise AssertionError(f"README shell line not runnable in tests: {line!r}")
    return words


@contextlib.contextmanager
def _one_thread():
    """What ``OMP_NUM_THREADS=1`` gives a command run in its own process."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class ReadmeRun:
    """The README run so far: one namespace, one directory, what each step printed."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.namespace: dict = {"__name__": "__readme__"}
        self.printed: dict[str, str] = {}
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}

    def run_through(self, step_id: str) -> str:
        """Run every step up to and including ``step_id`` not run yet; return what it printed."""
        for sid, lang, code in STEPS:
            if sid not in self.printed:
                self.printed[sid] = None  # a step that raised is not retried: later steps then fail here
                self.printed[sid] = self._run(sid, lang, code)
            if self.printed[sid] is None:
                pytest.fail(f"README step {sid!r} failed earlier, so {step_id!r} cannot run")
            if sid == step_id:
                return self.printed[sid]
        raise KeyError(step_id)

    def _run(self, sid: str, lang: str, code: str) -> str:
        if lang == "python":
            out = io.StringIO()
            with _inside(self.directory), contextlib.redirect_stdout(out):
                exec(compile(code, f"README.md ({sid})", "exec"), self.namespace)
            return out.getvalue()
        if lang == "bash":
            words = _words(code)
            if words[0] == "effsk":
                from effsk.cli import main

                out, err = io.StringIO(), io.StringIO()
                with _inside(self.directory), _one_thread(), contextlib.redirect_stdout(out), \
                        contextlib.redirect_stderr(err):
                    returncode = main(words[1:])
                assert returncode == 0, f"{code}\n{out.getvalue()}\n{err.getvalue()}"
                return out.getvalue()
            run = subprocess.run([sys.executable, "-m", "torch.distributed.run", *words[1:]], cwd=self.directory,
                                 env=self.env, capture_output=True, text=True, timeout=300)
            assert run.returncode == 0, f"{code}\n{run.stdout}\n{run.stderr}"
            return run.stdout
        pytest.fail(f"README block in unknown language {lang!r}")


@contextlib.contextmanager
def _inside(directory: Path):
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(directory)
        yield


@pytest.fixture(scope="module")
def readme(tmp_path_factory):
    return ReadmeRun(tmp_path_factory.mktemp("readme"))


def _printed_number(label: str, printed: str) -> float:
    match = re.search(rf"^{re.escape(label)}: (\d\.\d+)$", printed, re.M)
    assert match, f"no line {label!r}: in\n{printed}"
    return float(match.group(1))


def _chance(y_train, y_test) -> float:
    """Accuracy of always predicting the commonest training label."""
    values, counts = np.unique(y_train, return_counts=True)
    return float(np.mean(np.asarray(y_test) == values[counts.argmax()]))


def check_design_card(ns, printed, directory):
    accuracy = _printed_number("test accuracy", printed)
    assert accuracy == pytest.approx(ns["pipe"].score(ns["X_test"], ns["y_test"]), abs=5e-4)
    assert accuracy > _chance(ns["y_train"], ns["y_test"]) + 0.5  # measured 0.87; chance 0.1


def check_phi_search(ns, printed, directory):
    search = ns["search"]
    assert printed.strip() == str(search.best_params_)
    scores = search.cv_results_["mean_test_score"]
    assert len(scores) == 3 and np.isfinite(scores).all()


def check_tabular(ns, printed, directory):
    accuracy = _printed_number("train accuracy", printed)
    table = ns["table"]
    assert accuracy > _chance(table["label"], table["label"]) + 0.6  # measured 1.0
    assert sorted(os.listdir(directory / "images")) == sorted(os.path.basename(p) for p in table["image"])


def check_fine_tuning(ns, printed, directory):
    accuracy = _printed_number("fine-tuned accuracy", printed)
    assert accuracy == pytest.approx(ns["clf"].score(ns["X_test"], ns["y_test"]), abs=5e-4)
    assert accuracy > _chance(ns["y_train"], ns["y_test"]) + 0.3
    phases = [r["phase"] for r in ns["clf"].history_]  # one record per epoch: the head alone, then every layer
    assert phases[0] == "head" and len(phases) >= 2 and set(phases[1:]) == {"train"}


def check_pretraining(ns, printed, directory):
    checkpoint = ns["result"].checkpoint
    assert printed.splitlines()[0] == str(checkpoint) and os.path.isfile(checkpoint)
    assert ns["features"].shape == (len(ns["X_test"]), 1280)
    assert printed.splitlines()[1] == str(ns["features"].shape)


def check_model_family(ns, printed, directory):
    import torchvision

    lines = printed.splitlines()
    reference = torchvision.models.efficientnet_b3()  # torchvision's own B3, random weights: nothing downloads
    params = sum(p.numel() for p in reference.parameters())
    gflops = torchvision.models.EfficientNet_B3_Weights.IMAGENET1K_V1.meta["_ops"]  # torchvision's metadata
    count, macs = re.fullmatch(r"(\d+) (\d+\.\d+) GMACs", lines[0]).groups()
    assert int(count) == params and float(macs) == pytest.approx(gflops, abs=2e-3)
    baselines = [sum(p.numel() for p in net.parameters()) for net in (torchvision.models.resnet50(), torchvision.models.mobilenet_v2())]
    assert lines[-1] == f"{baselines[0]} {baselines[1]}"  # phi=0 of a baseline is the published network


def check_parquet(ns, printed, directory):
    import pandas as pd

    features = pd.read_parquet(directory / "features.parquet")
    assert len(features) == len(os.listdir(directory / "images"))


def check_file(path):
    def check(ns, printed, directory):
        assert (directory / path).is_file(), f"{path} was not written"

    return check


# What each step must have produced, keyed by the start of its test id.
CHECKS = {
    "the-design-card": check_design_card,
    "phi-is-a-hyperparameter": check_phi_search,
    "tabular-plus-image": check_tabular,
    "fine-tuning": check_fine_tuning,
    "pretraining-your-own-backbone-python": check_pretraining,
    "pretraining-your-own-backbone-effsk": check_file("run-cli/model.pt"),
    "pretraining-your-own-backbone-torchrun": check_file("run-ddp/model.pt"),
    "the-model-family": check_model_family,
    "command-line-effsk-2": check_parquet,
}


def test_setup_commands_are_what_ci_runs():
    section, lang, setup = _blocks()[0]
    assert lang == "bash"
    ci = (ROOT / ".ci" / "run").read_text()
    commands = [line.split("  #")[0].strip() for line in setup.strip().splitlines()]
    assert len(commands) == 2
    for command in commands:
        assert command in ci, f"{command!r} is not in .ci/run"


def test_every_step_is_checked_or_only_has_to_run():
    checked = {key for key in CHECKS if any(sid.startswith(key) for sid, _, _ in STEPS)}
    assert checked == set(CHECKS), f"checks for steps the README no longer has: {set(CHECKS) - checked}"
    assert len(STEPS) >= 11


@pytest.mark.parametrize("step_id", [sid for sid, _, _ in STEPS])
def test_readme_step(step_id, readme):
    printed = readme.run_through(step_id)
    for key, check in CHECKS.items():
        if step_id.startswith(key):
            with _inside(readme.directory):  # the blocks' relative paths
                check(readme.namespace, printed, readme.directory)
