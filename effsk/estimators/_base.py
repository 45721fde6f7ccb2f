"""Shared pieces of the effsk estimators: parameter constraints, model building, device and precision."""

from __future__ import annotations

import os
from numbers import Integral, Real

import torch
from sklearn.utils._param_validation import Interval, StrOptions

from ..nn.registry import ARCHITECTURES
from ..utils.runtime import PRECISIONS, resolve_device, resolve_precision
from ..scaling import SCALING_MODES, Scaling
from .. import weights as _weights

__all__ = [
    "MODEL_PARAMETER_CONSTRAINTS",
    "RUNTIME_PARAMETER_CONSTRAINTS",
    "build_estimator_model",
    "resolve_runtime",
]

#: Parameters that define the network: ``phi`` (a published name, a number >= 0 or a Scaling),
#: ``arch``, ``weights``, and the compound rule (``scaling``, ``alpha``, ``beta``, ``gamma``; ``None``
#: means the arch's own bases).
MODEL_PARAMETER_CONSTRAINTS = {
    "phi": [str, Interval(Real, 0, None, closed="left"), Scaling],
    "arch": [StrOptions(set(ARCHITECTURES))],
    "weights": [None, str, os.PathLike],
    "scaling": [StrOptions(set(SCALING_MODES))],
    "alpha": [Interval(Real, 1, None, closed="left"), None],
    "beta": [Interval(Real, 1, None, closed="left"), None],
    "gamma": [Interval(Real, 1, None, closed="left"), None],
}

#: Parameters that only say where and how the network runs.
RUNTIME_PARAMETER_CONSTRAINTS = {
    "batch_size": [Interval(Integral, 1, None, closed="left")],
    "device": [str, torch.device],
    "precision": [StrOptions(set(PRECISIONS))],
    "num_workers": [Interval(Integral, 0, None, closed="left")],
    "verbose": ["verbose"],
}


def build_estimator_model(estimator, *, num_classes: int = 0, **kwargs):
    """``(model, preprocessing)`` for an estimator's ``phi``, ``weights``, ``scaling``, ``alpha``,
    ``beta`` and ``gamma``, through the one seam :func:`effsk.weights.build_model`."""
    # through the module attribute, so that tests (and users) may substitute the builder
    return _weights.build_model(
        estimator.phi,
        estimator.weights,
        arch=estimator.arch,
        num_classes=num_classes,
        scaling=estimator.scaling,
        alpha=estimator.alpha,
        beta=estimator.beta,
        gamma=estimator.gamma,
        **kwargs,
    )


def resolve_runtime(estimator) -> tuple[torch.device, torch.dtype | None]:
    """The estimator's ``device`` and its autocast dtype (``None`` = fp32) from ``precision``."""
    device = resolve_device(estimator.device)
    return device, resolve_precision(estimator.precision, device)
