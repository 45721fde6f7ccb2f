import os

# Idle OpenMP threads sleep instead of spinning: on a busy 2-core machine spinning makes small
# forward passes 10-100x slower. Must be set before torch initialises OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

# The CI machine has 2 cores: one intra-op thread pool, no oversubscription. An explicit
# OMP_NUM_THREADS wins (torch reads it), so the training tests can be rerun on one thread.
if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _isolated_torch_home(tmp_path_factory, monkeypatch):
    """Never touch (or download into) the user's real torch hub cache during tests."""
    home = tmp_path_factory.getbasetemp() / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    yield
