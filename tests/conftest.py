import os

import pytest
import torch

# The CI machine has 2 cores: one intra-op thread pool, no oversubscription.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _isolated_torch_home(tmp_path_factory, monkeypatch):
    """Never touch (or download into) the user's real torch hub cache during tests."""
    home = tmp_path_factory.getbasetemp() / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    yield
