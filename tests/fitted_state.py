"""What predicting must leave alone: an estimator's attributes and how its network's tensors are stored."""

import copy
import pickle

import torch


class FittedState:
    """A snapshot of ``vars(estimator)`` (the objects themselves) and of every tensor of ``model_``:
    address, device, dtype, strides (memory format) and version counter (bumped by in-place writes)."""

    def __init__(self, estimator):
        self.attributes = dict(vars(estimator))
        self.training = estimator.model_.training
        self.tensors = {
            name: (t.data_ptr(), t.device, t.dtype, t.stride(), t._version)
            for name, t in estimator.model_.state_dict(keep_vars=True).items()
        }

    def assert_unchanged(self, estimator):
        after = FittedState(estimator)
        assert list(after.attributes) == list(self.attributes), "attributes were added or removed"
        rebound = [name for name, value in after.attributes.items() if value is not self.attributes[name]]
        assert not rebound, f"attributes rebound: {rebound}"
        assert after.training == self.training
        changed = [name for name in self.tensors if after.tensors[name] != self.tensors[name]]
        assert not changed, f"model_ tensors moved, re-laid out or written: {changed[:5]}"


def assert_pickle_carries_only_the_fitted_state(estimator, before_bytes: bytes):
    """After predicting, a pickle holds the same attributes as before and a CPU network of the same size."""
    after_bytes = pickle.dumps(estimator)
    assert abs(len(after_bytes) - len(before_bytes)) < 1024, (len(before_bytes), len(after_bytes))
    restored = pickle.loads(after_bytes)
    assert set(vars(restored)) == set(vars(pickle.loads(before_bytes)))
    modules = [name for name, value in vars(restored).items() if isinstance(value, torch.nn.Module)]
    assert modules == ["model_"], modules
    assert all(t.device.type == "cpu" for t in restored.model_.state_dict().values())
    return restored


def measure_batchnorm(model, images: torch.Tensor):
    """Set every BatchNorm's statistics to those of ``images`` (as precise BN does) and return the eval
    model: tiny fits leave channels with variances near 1e-12, whose float32 rounding alone differs
    from float64 by ~1e-4 of the outputs; measured statistics make comparisons at 1e-4 meaningful."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: one batch sets the statistics
    model.train()
    with torch.no_grad():
        model(images)
    return model.eval()


def remeasured_eval_outputs(estimator, X) -> torch.Tensor:
    """Measure the BatchNorm statistics of ``estimator.model_`` on ``X`` (in place), then return the
    outputs of that plain (unfolded, float64) eval network, fed like predict feeds its copy."""
    from effsk.data.images import make_loader

    images = torch.cat([batch for batch, _ in make_loader(X, estimator.preprocessing_, batch_size=8)])
    model = measure_batchnorm(estimator.model_, images)
    reference = copy.deepcopy(model).double()
    with torch.no_grad():
        return reference(images.double())
