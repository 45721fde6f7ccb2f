"""Step 1 of compound scaling on your own data: a grid search of (alpha, beta, gamma) at phi = 1.

The paper fixes phi = 1, enumerates depth, width and resolution bases under
``alpha * beta**2 * gamma**2 ~= 2`` (each phi step then about doubles the FLOPs), trains the scaled base
model for each and keeps the best triple. :func:`search_coefficients` does the same with the shared
training loop (:mod:`effsk.training`), one candidate per joblib task, every candidate with the same
data split, budget and seed. It is exposed as ``effsk.search_coefficients``.
"""

from __future__ import annotations

import itertools
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from numbers import Integral, Real
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch
from joblib import Parallel, cpu_count, delayed, effective_n_jobs
from sklearn.preprocessing import LabelEncoder
from sklearn.utils import _safe_indexing, check_random_state
from sklearn.utils._param_validation import Interval, StrOptions, validate_params

from ..data.images import make_loader, num_images
from ..data.preprocessing import default_preprocessing
from ..data.transforms import AUGMENT_PRESETS, eval_transform, train_transform
from ..nn.cost import count_macs, count_params
from ..nn.registry import ARCHITECTURES, build
from ..scaling import ARCH_DEFAULTS, Scaling, compound, resolve
from ..utils.runtime import forked_rng, resolve_device
from .config import PRECISE_BN_BATCHES, TrainConfig
from .loop import Trainer
from .splits import holdout_split

__all__ = [
    "DEFAULT_GRID",
    "CoefficientSearchResult",
    "Coefficients",
    "candidate_scaling",
    "fit_and_score",
    "search_coefficients",
]

#: Bases tried by default: depth up to 2 (depth alone can double the FLOPs), width and resolution
#: up to 1.4 (their squares reach 2). With ``tolerance=0.1``, 20 triples satisfy the constraint.
DEFAULT_GRID: dict[str, tuple[float, ...]] = {
    "alpha": (1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7, 1.8, 1.9, 2.0),
    "beta": (1.0, 1.1, 1.2, 1.3, 1.4),
    "gamma": (1.0, 1.1, 1.2, 1.3, 1.4),
}
_BASES = ("alpha", "beta", "gamma")
# Set by the search itself: the budget through max_epochs, the seed through random_state.
_RESERVED_CONFIG = ("max_epochs", "seed")
# Float slack on the constraint, so 1.1 * 1.1**2 * 1.2**2 and the like are judged as written.
_CONSTRAINT_SLACK = 1e-9


class Coefficients(NamedTuple):
    """Compound bases: depth ``alpha``, width ``beta``, resolution ``gamma``."""

    alpha: float
    beta: float
    gamma: float


@dataclass(frozen=True)
class CoefficientSearchResult:
    """What :func:`search_coefficients` found.

    Attributes
    ----------
    results_ : pandas.DataFrame
        One row per candidate, best first (index ``rank``, from 1): ``alpha``, ``beta``, ``gamma``,
        ``constraint`` (``alpha * beta**2 * gamma**2``), the phi = 1 model's ``depth`` and ``width``
        multipliers and input ``resolution`` (pixels), ``params``, ``macs`` (multiply-adds per
        image), ``train_loss``, ``val_loss``, ``val_score`` (top-1 accuracy on the held-out split)
        and ``train_seconds``. Ranked by ``val_score`` (higher first), then ``val_loss`` (lower
        first), then grid order.
    best_ : Coefficients
        The first row's ``(alpha, beta, gamma)``.
    best_score_ : float
        The first row's ``val_score``.
    """

    results_: pd.DataFrame
    best_: Coefficients
    best_score_: float


@dataclass(frozen=True)
class _Setup:
    """Everything every candidate shares (pickled once per joblib task)."""

    arch: str
    num_classes: int
    base_resolution: int
    base_width: float
    base_depth: float
    batch_size: int
    augment: str
    num_workers: int
    config: TrainConfig
    parent_pid: int
    threads: int


@validate_params(
    {
        "X": "no_validation",  # images of any kind effsk.data.images reads
        "y": ["array-like"],
        "arch": [StrOptions(set(ARCHITECTURES))],
        "grid": [Mapping, "array-like", None],  # its entries are checked with the constraint
        "tolerance": [Interval(Real, 0, None, closed="left")],
        "base_resolution": [Interval(Integral, 1, None, closed="left"), None],
        "base_width": [Interval(Real, 0, None, closed="neither")],
        "base_depth": [Interval(Real, 0, None, closed="neither")],
        "max_epochs": [Interval(Integral, 1, None, closed="left")],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
        "augment": [StrOptions(set(AUGMENT_PRESETS))],
        "validation_fraction": [Interval(Real, 0, 1, closed="neither")],
        "train_config": [Mapping, None],
        "num_workers": [Interval(Integral, 0, None, closed="left")],
        "n_jobs": [Integral, None],
        "random_state": ["random_state"],
        "verbose": ["verbose"],
    },
    prefer_skip_nested_validation=True,
)
def search_coefficients(
    X,
    y,
    *,
    arch: str = "efficientnet",
    grid=None,
    tolerance: float = 0.1,
    base_resolution: int | None = None,
    base_width: float = 1.0,
    base_depth: float = 1.0,
    max_epochs: int = 10,
    batch_size: int = 32,
    augment: str = "none",
    validation_fraction: float = 0.2,
    train_config: Mapping | None = None,
    num_workers: int = 0,
    n_jobs: int | None = None,
    random_state=0,
    verbose: int = 0,
) -> CoefficientSearchResult:
    """Grid-search the compound bases (alpha, beta, gamma) on ``(X, y)``: the paper's step 1.

    Every triple with ``|alpha * beta**2 * gamma**2 - 2| <= tolerance`` gives one candidate: the
    phi = 1 model of ``arch`` under those bases (``build(arch, 1, scaling="compound", alpha=...,
    beta=..., gamma=...)``, input ``round(base_resolution * gamma)`` pixels), trained from random
    initialisation for ``max_epochs`` epochs on the same stratified split with the same seed, and
    scored by top-1 accuracy on the held-out images.

    Parameters
    ----------
    X : images
        Anything :mod:`effsk.data.images` reads: paths, encoded bytes, PIL images, arrays, an
        (N,H,W,C) / (N,H,W) array or an (N,C,H,W) tensor.
    y : array-like of shape (n_samples,)
        Class labels.
    arch : {"efficientnet", "resnet50", "mobilenet_v2", "mobilenet_v1"}, default="efficientnet"
        The base network.
    grid : mapping or sequence of triples, optional
        A mapping ``{"alpha": [...], "beta": [...], "gamma": [...]}`` whose product is filtered by
        the constraint, or an explicit sequence of ``(alpha, beta, gamma)`` triples, each of which
        must satisfy it. Default: :data:`DEFAULT_GRID` (20 candidates at the default tolerance).
    tolerance : float, default=0.1
        Allowed distance of ``alpha * beta**2 * gamma**2`` from 2.
    base_resolution : int, optional
        Input size of the phi = 0 model; default: the arch's (224). Small images want small
        values (e.g. 32); each candidate sees ``round(base_resolution * gamma)`` pixels.
    base_width, base_depth : float, default=1.0
        Shrink (or grow) the base model before scaling it, for a cheaper search: a candidate's
        multipliers are ``base_width * beta`` and ``base_depth * alpha``.
    max_epochs : int, default=10
        Training budget per candidate.
    batch_size : int, default=32
    augment : {"none", "light", "randaugment", "autoaugment"}, default="none"
        Train-time augmentation (:func:`effsk.data.transforms.train_transform`).
    validation_fraction : float, default=0.2
        Share of the images held out (stratified by class) for scoring.
    train_config : mapping, optional
        Further :class:`effsk.training.TrainConfig` fields (``lr``, ``optimizer``, ``device``,
        ``precision``, ...) shared by all candidates. Default: TrainConfig's defaults with precise
        BatchNorm statistics (64 batches). The budget and the seed come from ``max_epochs`` and
        ``random_state``.
    num_workers : int, default=0
        DataLoader workers per candidate.
    n_jobs : int, optional
        Candidates trained at once, each in its own process (joblib's default process backend;
        ``None`` means 1 unless a :func:`joblib.parallel_config` context says otherwise, -1 all
        CPUs). Workers share the CPUs: each gets ``cpu_count // workers`` torch threads. The table
        equals a serial run's at the same torch thread count (float reductions depend on it).
    random_state : int, RandomState or None, default=0
        Seeds the split, the weight initialisation and the batch order (the same for every
        candidate).
    verbose : int, default=0
        ``>= 1``: one line per finished candidate; ``>= 2``: also the training loop's epoch lines.

    Returns
    -------
    CoefficientSearchResult
        ``results_`` (a ranked DataFrame), ``best_`` (the best triple) and ``best_score_``.

    Raises
    ------
    ValueError
        A setting out of its range (scikit-learn's ``InvalidParameterError``, which names it), a
        malformed grid, a grid with no triple within the tolerance, an explicit triple outside it,
        too few images per class for the split, or an unknown TrainConfig field.

    Examples
    --------
    >>> import numpy as np
    >>> from effsk import search_coefficients
    >>> rng = np.random.default_rng(0)
    >>> y = np.arange(12) % 2
    >>> X = (rng.integers(0, 60, (12, 8, 8, 3)) + 120 * y[:, None, None, None]).astype(np.uint8)
    >>> search = search_coefficients(X, y, arch="mobilenet_v1", grid=[(2.0, 1.0, 1.0), (1.0, 1.0, 1.4)],
    ...                              base_resolution=8, base_width=0.25, base_depth=0.25, max_epochs=1,
    ...                              validation_fraction=0.5, train_config={"device": "cpu"})
    >>> search.results_[["alpha", "beta", "gamma", "resolution"]].sort_values("alpha").values.tolist()
    [[1.0, 1.0, 1.4, 11.0], [2.0, 1.0, 1.0, 8.0]]
    >>> table = search.results_
    >>> bool(table["val_score"].is_monotonic_decreasing), bool(search.best_score_ == table["val_score"].max())
    (True, True)
    >>> tuple(search.best_) == tuple(table.iloc[0][["alpha", "beta", "gamma"]])
    True
    """
    candidates = _candidates(grid, float(tolerance))
    base_resolution = ARCH_DEFAULTS[arch].resolution if base_resolution is None else base_resolution
    seed = int(check_random_state(random_state).randint(np.iinfo(np.int32).max))
    config = _train_config(train_config, max_epochs, seed, verbose)
    targets, num_classes = _encode_labels(X, y)
    train_idx, val_idx = holdout_split(
        len(targets), validation_fraction, seed=seed, stratify=targets,
        remedy="Use more images per class or another validation_fraction.",
    )

    workers = min(effective_n_jobs(n_jobs), len(candidates))
    setup = _Setup(
        arch=arch,
        num_classes=num_classes,
        base_resolution=int(base_resolution),
        base_width=float(base_width),
        base_depth=float(base_depth),
        batch_size=int(batch_size),
        augment=augment,
        num_workers=int(num_workers),
        config=config,
        parent_pid=os.getpid(),
        threads=max(1, cpu_count() // workers),
    )
    data = (
        _safe_indexing(X, train_idx),
        targets[train_idx],
        _safe_indexing(X, val_idx),
        targets[val_idx],
    )
    if verbose:
        print(f"search_coefficients: {len(candidates)} candidates for arch={arch!r}, {workers} at a time")
    rows = []
    jobs = (delayed(_train_candidate)(c, setup, *data) for c in candidates)
    for row in Parallel(n_jobs=workers, prefer="processes", return_as="generator")(jobs):
        rows.append(row)
        if verbose:
            print(
                f"  alpha={row['alpha']:g} beta={row['beta']:g} gamma={row['gamma']:g}: "
                f"val_score {row['val_score']:.4f}  val_loss {row['val_loss']:.4f}  "
                f"{row['macs'] / 1e6:.1f}M MACs  {row['train_seconds']:.1f}s"
            )
    return _result(rows)


@validate_params(
    {
        "arch": [StrOptions(set(ARCHITECTURES))],
        "coefficients": [tuple],
        "base_resolution": [Interval(Integral, 1, None, closed="left")],
        "base_width": [Interval(Real, 0, None, closed="neither")],
        "base_depth": [Interval(Real, 0, None, closed="neither")],
    },
    prefer_skip_nested_validation=True,
)
def candidate_scaling(
    arch: str,
    coefficients: Coefficients,
    *,
    base_resolution: int,
    base_width: float = 1.0,
    base_depth: float = 1.0,
) -> Scaling:
    """The phi = 1 config of ``arch`` under ``coefficients``, from a base of the given size.

    >>> s = candidate_scaling("efficientnet", Coefficients(1.2, 1.1, 1.15), base_resolution=32)
    >>> round(s.depth, 4), round(s.width, 4), s.resolution
    (1.2, 1.1, 37)
    """
    scaling = resolve(1, scaling="compound", alpha=coefficients.alpha, beta=coefficients.beta,
                      gamma=coefficients.gamma, arch=arch)
    growth = compound(1, *coefficients)
    return replace(
        scaling,
        depth=base_depth * growth.depth,
        width=base_width * growth.width,
        resolution=round(base_resolution * growth.resolution),
    )


# -- training one config (runs in a joblib worker) ----------------------------------------------------


@validate_params(
    {
        "arch": [StrOptions(set(ARCHITECTURES))],
        "scaling": [Scaling],
        "X_train": "no_validation",
        "y_train": ["array-like"],
        "X_val": "no_validation",
        "y_val": ["array-like"],
        "num_classes": [Interval(Integral, 2, None, closed="left")],
        "config": [TrainConfig],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
        "augment": [StrOptions(set(AUGMENT_PRESETS))],
        "num_workers": [Interval(Integral, 0, None, closed="left")],
    },
    prefer_skip_nested_validation=True,
)
def fit_and_score(
    arch: str,
    scaling: Scaling,
    X_train,
    y_train,
    X_val,
    y_val,
    *,
    num_classes: int,
    config: TrainConfig,
    batch_size: int = 32,
    augment: str = "none",
    num_workers: int = 0,
) -> dict:
    """Train ``build(arch, scaling)`` from scratch on ``(X_train, y_train)``; score it on the rest.

    The one recipe every scaled model of a search or a scaling study goes through: weights drawn
    with ``torch.manual_seed(config.seed)``, the model's default preprocessing at
    ``scaling.resolution``, batches shuffled by a generator seeded from ``config.seed``, and the
    shared :class:`~effsk.training.Trainer` with ``config``. The caller's RNG is left as it was.

    Parameters
    ----------
    arch : str
        A key of :data:`effsk.nn.ARCHITECTURES`.
    scaling : Scaling
        The model's config (depth, width, resolution); its ``resolution`` is the input size.
    X_train, X_val : images
        As :func:`effsk.data.images.make_loader` reads them.
    y_train, y_val : array of int
        Class indices in ``[0, num_classes)``.
    num_classes : int
    config : TrainConfig
        Budget, optimiser and seed (``config.seed`` must be set).
    batch_size : int, default=32
    augment : str, default="none"
        :func:`effsk.data.transforms.train_transform` preset.
    num_workers : int, default=0

    Returns
    -------
    dict
        ``params``, ``macs`` (per image at ``scaling.resolution``), ``train_loss``, ``val_loss``,
        ``val_score`` (top-1 accuracy) of the final model (the best epoch's with early stopping),
        ``train_seconds`` and the training ``history``.
    """
    if config.seed is None:
        raise ValueError("fit_and_score needs config.seed: every compared model starts from the same seed.")
    y_train, y_val = np.asarray(y_train), np.asarray(y_val)
    with forked_rng(resolve_device(config.device)):
        torch.manual_seed(config.seed)
        model = build(arch, scaling, num_classes=num_classes)
        params, macs = count_params(model), count_macs(model)
        preprocessing = default_preprocessing(scaling)
        batch_size = min(batch_size, len(y_train))
        train_loader = make_loader(
            X_train,
            preprocessing,
            transform=train_transform(preprocessing, augment),
            targets=y_train,
            batch_size=batch_size,
            shuffle=True,
            num_workers=num_workers,
            generator=torch.Generator().manual_seed(config.seed),
            drop_last=len(y_train) % batch_size == 1,  # BatchNorm cannot train on one image
        )
        val_loader = make_loader(
            X_val,
            preprocessing,
            transform=eval_transform(preprocessing),
            targets=y_val,
            batch_size=batch_size,
            num_workers=num_workers,
        )
        start = time.perf_counter()
        trainer = Trainer(model, train_loader, val_loader, config)
        history = trainer.fit()
        seconds = time.perf_counter() - start
    # With early stopping the model ends at its best epoch; otherwise the budget's last epoch counts.
    final = history[trainer.best_epoch] if config.early_stopping else history[-1]
    return {
        "params": params,
        "macs": macs,
        "train_loss": final["train_loss"],
        "val_loss": final["val_loss"],
        "val_score": final["val_score"],
        "train_seconds": seconds,
        "history": history,
    }


def _train_candidate(coefficients: Coefficients, setup: _Setup, X_train, y_train, X_val, y_val) -> dict:
    if os.getpid() != setup.parent_pid:  # a worker process: share the CPUs, leave the caller's setting alone
        torch.set_num_threads(setup.threads)
    scaling = candidate_scaling(
        setup.arch,
        coefficients,
        base_resolution=setup.base_resolution,
        base_width=setup.base_width,
        base_depth=setup.base_depth,
    )
    scores = fit_and_score(
        setup.arch,
        scaling,
        X_train,
        y_train,
        X_val,
        y_val,
        num_classes=setup.num_classes,
        config=setup.config,
        batch_size=setup.batch_size,
        augment=setup.augment,
        num_workers=setup.num_workers,
    )
    del scores["history"]
    return {
        "alpha": coefficients.alpha,
        "beta": coefficients.beta,
        "gamma": coefficients.gamma,
        "constraint": _constraint(coefficients),
        "depth": scaling.depth,
        "width": scaling.width,
        "resolution": scaling.resolution,
        **scores,
    }


# -- inputs ----------------------------------------------------------------------------------------


def _constraint(c: Coefficients) -> float:
    return c.alpha * c.beta**2 * c.gamma**2


def _feasible(c: Coefficients, tolerance: float) -> bool:
    return abs(_constraint(c) - 2.0) <= tolerance + _CONSTRAINT_SLACK


def _check_base(where: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not (math.isfinite(value) and value >= 1):
        raise ValueError(f"{where}={value!r} is not valid; compound bases are finite numbers >= 1.")
    return float(value)


def _candidates(grid, tolerance: float) -> list[Coefficients]:
    """The triples to train, in grid order."""
    grid = DEFAULT_GRID if grid is None else grid
    if isinstance(grid, Mapping):
        if set(grid) != set(_BASES):
            raise ValueError(f"grid has keys {sorted(grid)}; a grid mapping needs exactly 'alpha', 'beta', 'gamma'.")
        axes = []
        for name in _BASES:
            values = grid[name]
            if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
                values = [values]
            values = [_check_base(f"grid[{name!r}][{i}]", v) for i, v in enumerate(values)]
            if not values:
                raise ValueError(f"grid[{name!r}] is empty; give at least one value.")
            axes.append(sorted(set(values)))
        product = [Coefficients(*t) for t in itertools.product(*axes)]
        feasible = [c for c in product if _feasible(c, tolerance)]
        if not feasible:
            closest = min(product, key=lambda c: abs(_constraint(c) - 2.0))
            raise ValueError(
                f"no (alpha, beta, gamma) of the grid's {len(product)} satisfies "
                f"|alpha * beta**2 * gamma**2 - 2| <= tolerance={tolerance:g}; the closest is "
                f"{tuple(closest)} with {_constraint(closest):.4f}. Add values or raise the tolerance."
            )
        return feasible
    try:
        triples = list(grid)
    except TypeError:
        raise ValueError(
            f"grid of type {type(grid).__name__} is not valid; use a mapping of 'alpha', 'beta', 'gamma' "
            "values or a sequence of (alpha, beta, gamma) triples."
        ) from None
    if not triples:
        raise ValueError("grid is empty; give at least one (alpha, beta, gamma) triple.")
    out: list[Coefficients] = []
    for i, triple in enumerate(triples):
        if isinstance(triple, (str, bytes)) or not hasattr(triple, "__len__") or len(triple) != 3:
            raise ValueError(f"grid[{i}]={triple!r} is not valid; each entry is an (alpha, beta, gamma) triple.")
        c = Coefficients(*(_check_base(f"grid[{i}].{name}", v) for name, v in zip(_BASES, triple)))
        if not _feasible(c, tolerance):
            raise ValueError(
                f"grid[{i}]={tuple(c)} has alpha * beta**2 * gamma**2 = {_constraint(c):.4f}, more than "
                f"tolerance={tolerance:g} away from 2."
            )
        if c in out:
            raise ValueError(f"grid[{i}]={tuple(c)} repeats grid[{out.index(c)}].")
        out.append(c)
    return out


def _train_config(train_config: Mapping | None, max_epochs: int, seed: int, verbose: int) -> TrainConfig:
    settings = dict(train_config or {})
    known = {f.name for f in fields(TrainConfig)}
    for key in settings:
        if key in _RESERVED_CONFIG:
            raise ValueError(
                f"train_config[{key!r}] is set by the search; use max_epochs= for the budget and "
                "random_state= for the seed."
            )
        if key not in known:
            raise ValueError(f"train_config[{key!r}] is not a TrainConfig field; known fields: {sorted(known)}.")
    settings.setdefault("precise_bn_batches", PRECISE_BN_BATCHES)
    settings.setdefault("verbose", max(0, verbose - 1))
    return TrainConfig(max_epochs=int(max_epochs), seed=seed, **settings)


def _encode_labels(X, y) -> tuple[np.ndarray, int]:
    n = num_images(X)
    labels = np.asarray(y)
    if labels.ndim != 1:
        raise ValueError(f"y has shape {labels.shape}; search_coefficients needs one class label per image.")
    if len(labels) != n:
        raise ValueError(f"X has {n} images but y has {len(labels)} labels; they must have the same length.")
    encoder = LabelEncoder().fit(labels)
    if len(encoder.classes_) < 2:
        raise ValueError(f"y has {len(encoder.classes_)} class; a classification search needs at least 2.")
    return encoder.transform(labels).astype(np.int64), len(encoder.classes_)


def _result(rows: list[dict]) -> CoefficientSearchResult:
    table = pd.DataFrame(rows)
    table["order"] = np.arange(len(table))
    table = table.sort_values(["val_score", "val_loss", "order"], ascending=[False, True, True], kind="mergesort")
    table = table.drop(columns="order").reset_index(drop=True)
    table.index = pd.RangeIndex(1, len(table) + 1, name="rank")
    best = table.iloc[0]
    return CoefficientSearchResult(
        results_=table,
        best_=Coefficients(float(best["alpha"]), float(best["beta"]), float(best["gamma"])),
        best_score_=float(best["val_score"]),
    )
