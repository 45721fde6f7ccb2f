import os

# Idle OpenMP threads sleep instead of spinning: on a busy 2-core machine spinning makes small
# forward passes 10-100x slower. Must be set before torch initialises OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

# One intra-op thread: the tests' tensors are tiny, and with passive waiting a second thread is woken
# for every op, which costs more than it computes (measured on 2 cores: test_nn, test_featurizer and
# test_training take 25 s on one thread, 31 s on two). The subprocesses that tests start (torchrun,
# the CLI) get the other core. An explicit OMP_NUM_THREADS wins (torch reads it), so the training
# tests can be rerun on two threads.
if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _isolated_torch_home(tmp_path_factory, monkeypatch):
    """Never touch (or download into) the user's real torch hub cache during tests."""
    home = tmp_path_factory.getbasetemp() / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    yield
