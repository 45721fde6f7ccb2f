"""Every code block of README.md runs: python blocks in one namespace, shell blocks as commands,
all in document order in a scratch directory. The set-up block is what CI (.ci/run) executes."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"^```(\w+)\n(.*?)^```", re.S | re.M)


def _blocks():
    return BLOCK.findall((ROOT / "README.md").read_text())


def _command(line: str) -> list[str]:
    words = shlex.split(line.split("  #")[0])
    if words[0] == "effsk":
        return [sys.executable, "-m", "effsk", *words[1:]]
    if words[0] == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", *words[1:]]
    raise AssertionError(f"README shell line not runnable in tests: {line!r}")


def test_setup_commands_are_what_ci_runs():
    lang, setup = _blocks()[0]
    assert lang == "bash"
    ci = (ROOT / ".ci" / "run").read_text()
    commands = [line.split("  #")[0].strip() for line in setup.strip().splitlines()]
    assert len(commands) == 2
    for command in commands:
        assert command in ci, f"{command!r} is not in .ci/run"


def test_every_readme_block_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    namespace: dict = {"__name__": "__readme__"}
    ran = 0
    for lang, code in _blocks()[1:]:
        if lang == "python":
            exec(compile(code, "README.md", "exec"), namespace)
        elif lang == "bash":
            for line in filter(None, (ln.strip() for ln in code.splitlines())):
                run = subprocess.run(_command(line), cwd=tmp_path, env=env, capture_output=True, text=True,
                                     timeout=300)
                assert run.returncode == 0, f"{line}\n{run.stdout}\n{run.stderr}"
        else:
            pytest.fail(f"README block in unknown language {lang!r}")
        ran += 1
    assert ran >= 8
    assert 0.0 <= namespace["pipe"].score(namespace["X_test"], namespace["y_test"]) <= 1.0
    assert os.path.isfile(namespace["result"].checkpoint)
    assert os.path.isfile("features.parquet") and os.path.isfile("run-ddp/model.pt")
