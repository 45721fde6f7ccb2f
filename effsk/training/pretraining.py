"""The pretraining path: train an EfficientNet backbone on a labelled image collection.

:func:`pretrain` trains from scratch (or continues from weights) with a recipe (:mod:`.recipes`):
``"paper"`` (Tan & Le's ImageNet recipe, REFERENCE.md) or ``"modern"`` (AdamW, cosine, RandAugment);
every recipe value can be overridden. It runs the one training loop (:class:`effsk.training.Trainer`),
on one device or data-parallel under ``torchrun`` (DistributedDataParallel, NCCL on GPUs, gloo on CPU).

An output directory holds the run (:mod:`.run_state`)::

    model.pt              the final effsk checkpoint (classes and preprocessing included): usable as
                          ``weights=`` by build_model, EfficientNetFeaturizer and EfficientNetClassifier
    train_state.pt        the whole training state, rewritten atomically every epoch and every
                          ``save_every_steps`` optimiser steps; ``resume=True`` continues from it
    metrics.jsonl/.csv    one record per epoch: loss, top-1/top-5, lr, images/s
    training_curves.png   the curves of those records
    run.json              the resolved settings of the run
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass, replace
from numbers import Integral, Real
from typing import Any

import torch
from sklearn.utils._param_validation import Interval, StrOptions, validate_params
from torch import nn

from ..data.datasets import TABLE_EXTENSIONS, LabelledImages, image_folder, image_table
from ..data.gpu_decode import resolve_num_workers
from ..data.images import make_loader
from ..data.transforms import eval_transform, train_transform
from ..scaling import SCALING_MODES, Scaling
from ..utils.fileio import atomic_write
from ..utils.runtime import PRECISIONS, resolve_device
from ..weights.checkpoint import save_checkpoint
from . import distributed
from .loop import Trainer
from .recipes import RECIPES, Recipe, get_recipe
from .run_state import (CHECKPOINT_FILE, STATE_FILE, PretrainCallback, RunFiles, load_into_trainer, plain, read_state,
                        sync_log)
from .splits import holdout_split

__all__ = ["Recipe", "RECIPES", "get_recipe", "PretrainResult", "pretrain", "load_images", "CHECKPOINT_FILE",
           "STATE_FILE"]


@dataclass
class PretrainResult:
    """What :func:`pretrain` produced: the final effsk checkpoint and the per-epoch history."""

    checkpoint: str
    history: list[dict]
    output_dir: str
    metrics: str
    plot: str | None
    state: str


@dataclass(frozen=True)
class _ModelSpec:
    """Which network a run trains: the variant, its starting weights, how it runs."""

    phi: Any
    weights: Any
    scaling: str
    resolution: int | None
    sync_bn: bool
    compile: bool


@dataclass(frozen=True)
class _RunSpec:
    """How a run trains it, resolved from :func:`pretrain`'s arguments and the process group."""

    recipe: Recipe
    batch_size: int  # global
    per_rank_batch: int
    lr: float
    device: torch.device
    precision: str
    channels_last: bool | None
    num_workers: int
    seed: int
    verbose: int
    save_every_steps: int | None
    resuming: bool
    sources: dict  # the data arguments as given, for run.json


# -- data ---------------------------------------------------------------------------------------------


def load_images(source, *, path_column: str = "path", label_column: str = "label", classes=None) -> LabelledImages:
    """Labelled image paths from an ImageFolder-style directory or a CSV/parquet table."""
    if isinstance(source, LabelledImages):
        return source
    path = os.fspath(source)
    if os.path.isdir(path):
        return image_folder(path, classes)
    if os.path.isfile(path) and path.lower().endswith(TABLE_EXTENSIONS):
        if not label_column:
            raise ValueError("pretraining needs labels: pass label_column")
        images = image_table(path, path_column=path_column, label_column=label_column, classes=classes)
        if not images.paths:
            raise ValueError(f"table {path!r} has no rows")
        return images
    raise FileNotFoundError(
        f"image source {path!r} is neither a directory of class folders nor a .csv/.parquet table with "
        f"{path_column!r} and {label_column!r} columns"
    )


def _subset(images: LabelledImages, index) -> LabelledImages:
    return LabelledImages([images.paths[i] for i in index], [images.labels[i] for i in index], images.classes)


def _datasets(data, val_data, val_fraction, *, path_column, label_column, seed):
    """Training images, and validation images from ``val_data`` or held out (or ``None``)."""
    train = load_images(data, path_column=path_column, label_column=label_column)
    if val_data is not None:
        return train, load_images(val_data, path_column=path_column, label_column=label_column, classes=train.classes)
    if val_fraction == 0:
        return train, None
    train_idx, val_idx = holdout_split(
        len(train), val_fraction, seed=seed, stratify=train.labels, param="val_fraction",
        remedy="Pass val_data, a larger val_fraction, or val_fraction=0.",
    )
    return _subset(train, train_idx), _subset(train, val_idx)


def _check_batches(train, val, batch_size: int, env: distributed.DistEnv) -> None:
    if batch_size % env.world_size:
        raise ValueError(f"batch_size={batch_size} (the global batch) must be divisible by the {env.world_size} processes")
    if len(train) // env.world_size < batch_size // env.world_size:
        raise ValueError(f"{len(train)} training images cannot fill one global batch of {batch_size}; use a smaller batch_size")
    if val is not None and len(val) < env.world_size:
        raise ValueError(f"{len(val)} validation images for {env.world_size} processes: every process needs at least one")


def _describe(source) -> str | None:
    if source is None:
        return None
    return "<LabelledImages>" if isinstance(source, LabelledImages) else os.fspath(source)


def _fingerprint(images: LabelledImages | None) -> dict | None:
    if images is None:
        return None
    digest = hashlib.sha256()
    for path, label in zip(images.paths, images.labels):
        digest.update(f"{path}\t{label}\n".encode())
    return {"images": len(images), "sha256": digest.hexdigest()}


# -- model and loaders --------------------------------------------------------------------------------------------


def _set_batchnorm(model, *, momentum: float | None, eps: float | None) -> None:
    """Change every BatchNorm layer and record the values in ``model.scaling`` (saved in checkpoints)."""
    changes = {k: v for k, v in (("bn_momentum", momentum), ("bn_eps", eps)) if v is not None}
    if not changes:
        return
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = changes.get("bn_momentum", m.momentum)
            m.eps = changes.get("bn_eps", m.eps)
    model.scaling = replace(model.scaling, **changes)


def _build(spec: _ModelSpec, run: _RunSpec, num_classes: int, env: distributed.DistEnv):
    """The model (the same initial weights on every rank) and its preprocessing at the run's size."""
    from ..weights.build import build_model

    torch.manual_seed(run.seed)
    model, preprocessing = build_model(
        spec.phi, spec.weights, num_classes=num_classes, scaling=spec.scaling, drop_rate=run.recipe.drop_rate,
        drop_path_rate=run.recipe.drop_path_rate, progress=env.is_main and run.verbose > 0,
    )
    _set_batchnorm(model, momentum=run.recipe.bn_momentum, eps=run.recipe.bn_eps if spec.weights is None else None)
    if spec.resolution is not None:
        preprocessing = preprocessing.with_resolution(int(spec.resolution))
    if spec.sync_bn and env.is_distributed:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model, preprocessing


def _loaders(train, val, preprocessing, run: _RunSpec, env: distributed.DistEnv):
    """Per-rank loaders: resumable shuffled training shards, validation split over the ranks."""
    pin = run.device.type == "cuda"
    train_loader = make_loader(
        train.paths, preprocessing, transform=train_transform(preprocessing, run.recipe.augment), targets=train.labels,
        batch_size=run.per_rank_batch, num_workers=run.num_workers, pin_memory=pin, generator=torch.Generator(),
        drop_last=True,
        sampler=distributed.ResumableDistributedSampler(
            range(len(train)), num_replicas=env.world_size, rank=env.rank, shuffle=True, seed=run.seed, drop_last=True
        ),
    )
    if val is None:
        return train_loader, None
    val_loader = make_loader(
        val.paths, preprocessing, transform=eval_transform(preprocessing), targets=val.labels,
        batch_size=run.per_rank_batch, num_workers=run.num_workers, pin_memory=pin,
        sampler=distributed.ShardSampler(len(val), env.world_size, env.rank),
    )
    return train_loader, val_loader


# -- the run ------------------------------------------------------------------------------------------


def _signature(model, preprocessing, train, val, run: _RunSpec) -> dict:
    """The settings a resumed run must share with the run it continues."""
    return plain({
        "arch": model.scaling.as_dict(),
        "num_classes": len(train.classes),
        "classes": train.classes,
        "train": _fingerprint(train),
        "val": _fingerprint(val),
        "batch_size": run.batch_size,
        "lr": run.lr,
        "preprocessing": preprocessing.to_dict(),
        "recipe": run.recipe.settings(),
        "seed": run.seed,
    })


def _trainer(model, loaders, callback, spec: _ModelSpec, run: _RunSpec, env: distributed.DistEnv) -> Trainer:
    config = run.recipe.train_config(
        lr=run.lr, device=run.device, precision=run.precision, channels_last=run.channels_last,
        # worker seeds: per epoch (so a resumed epoch replays them) and per rank
        seed=run.seed + 1_000_003 * env.rank, verbose=run.verbose,
    )

    def wrap(module: nn.Module) -> nn.Module:
        if env.is_distributed:
            device_ids = [run.device.index] if run.device.type == "cuda" else None
            module = nn.parallel.DistributedDataParallel(module, device_ids=device_ids)
        return torch.compile(module) if spec.compile else module

    return Trainer(
        model, *loaders, config, callbacks=[callback], wrap_model=wrap,
        gather=distributed.all_gather_cat if env.is_distributed else None,
        sync_buffers=distributed.average_buffers if env.is_distributed else None,
        main_process=env.is_main,
    )


def _write_run_json(files: RunFiles, trainer: Trainer, signature: dict, spec, run, env) -> None:
    settings = {
        **run.sources, "world_size": env.world_size, "per_process_batch": run.per_rank_batch,
        "device": str(run.device), "precision": run.precision, "num_workers": run.num_workers,
        "compile": spec.compile, "sync_bn": spec.sync_bn, "steps_per_epoch": trainer.steps_per_epoch, **signature,
    }
    with atomic_write(files.run, "w") as fh:
        json.dump(settings, fh, indent=2)


def _save_checkpoint(files: RunFiles, trainer: Trainer, preprocessing, train, val, run, env) -> str | None:
    """Write the final effsk checkpoint and the curves; return the plot's path."""
    last = trainer.history[-1] if trainer.history else {}
    metadata = {
        "pretrain": {
            "recipe": plain(run.recipe.settings()), "lr": run.lr, "batch_size": run.batch_size,
            "world_size": env.world_size, "epochs": trainer.epoch, "steps": trainer.step,
            "train_images": len(train), "val_images": 0 if val is None else len(val),
            "final": {k: v for k, v in last.items() if isinstance(v, (int, float))},
        },
    }
    save_checkpoint(files.checkpoint, trainer.module, preprocessing, classes=train.classes, metadata=metadata)
    return files.log.plot()


def _run(train, val, files: RunFiles, env: distributed.DistEnv, spec: _ModelSpec, run: _RunSpec) -> PretrainResult:
    model, preprocessing = _build(spec, run, len(train.classes), env)
    torch.manual_seed(run.seed + env.rank)  # dropout, stochastic depth and augmentation differ per rank
    loaders = _loaders(train, val, preprocessing, run, env)
    signature = _signature(model, preprocessing, train, val, run)
    callback = PretrainCallback(files, signature, env, run.save_every_steps)
    trainer = _trainer(model, loaders, callback, spec, run, env)
    if run.resuming:
        load_into_trainer(trainer, read_state(files.state, signature), env)
    if env.is_main:
        os.makedirs(files.dir, exist_ok=True)
        files.remove_partial_writes()
        sync_log(files.log, trainer.history)
        _write_run_json(files, trainer, signature, spec, run, env)

    history = trainer.fit()
    distributed.check_same_across_ranks(trainer.module)
    plot = _save_checkpoint(files, trainer, preprocessing, train, val, run, env) if env.is_main else None
    distributed.barrier()
    if plot is None and os.path.exists(files.log.png):
        plot = files.log.png
    return PretrainResult(
        checkpoint=files.checkpoint, history=history, output_dir=files.dir, metrics=files.log.csv, plot=plot,
        state=files.state,
    )


@contextlib.contextmanager
def _cudnn_benchmark(device: torch.device):
    if device.type != "cuda":
        yield
        return
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick the fastest kernels
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = previous


def _process_device(device, env: distributed.DistEnv, sync_bn: bool) -> torch.device:
    """This process's device: ``cuda:LOCAL_RANK`` under torchrun on GPUs."""
    device = resolve_device(device)
    if not env.is_distributed:
        return device
    if device.type == "cuda":
        return torch.device("cuda", env.local_rank)
    if device.type != "cpu":
        raise ValueError(f"distributed pretraining runs on CUDA (NCCL) or CPU (gloo), not {device.type}")
    if sync_bn:
        raise ValueError("sync_bn=True needs CUDA devices: torch's SyncBatchNorm does not run on CPU")
    return device


def _resuming(files: RunFiles, resume) -> bool:
    has_state = os.path.exists(files.state)
    if resume is True and not has_state:
        raise FileNotFoundError(f"resume=True but {files.state!r} does not exist: there is no run to resume there")
    if resume is False and has_state:
        raise FileExistsError(
            f"{files.dir!r} already holds a run ({STATE_FILE}); pass resume=True to continue it or choose another output_dir"
        )
    return has_state and resume in (True, "auto")


@validate_params(
    {
        "data": [str, os.PathLike, LabelledImages],
        "output_dir": [str, os.PathLike],
        "phi": [str, Real, Scaling, None],
        "recipe": [StrOptions(set(RECIPES)), Recipe],
        "val_data": [str, os.PathLike, LabelledImages, None],
        "val_fraction": [Interval(Real, 0, 1, closed="left")],
        "weights": [str, os.PathLike, None],
        "epochs": [Interval(Integral, 1, None, closed="left"), None],
        "batch_size": [Interval(Integral, 2, None, closed="left")],
        "lr": [Interval(Real, 0, None, closed="neither"), None],
        "resolution": [Interval(Integral, 1, None, closed="left"), None],
        "scaling": [StrOptions(set(SCALING_MODES))],
        "path_column": [str],
        "label_column": [str],
        "resume": ["boolean", StrOptions({"auto"})],
        "save_every_steps": [Interval(Integral, 1, None, closed="left"), None],
        "device": [str, torch.device],
        "precision": [StrOptions(set(PRECISIONS))],
        "channels_last": ["boolean", None],
        "compile": ["boolean"],
        "sync_bn": ["boolean"],
        "num_workers": [Interval(Integral, 0, None, closed="left"), None],
        "seed": [Interval(Integral, 0, None, closed="left")],
        "verbose": ["verbose"],
    },
    prefer_skip_nested_validation=True,
)
def pretrain(
    data,
    *,
    output_dir,
    phi="b0",
    recipe: str | Recipe = "modern",
    val_data=None,
    val_fraction: float = 0.0,
    weights=None,
    epochs: int | None = None,
    batch_size: int = 256,
    lr: float | None = None,
    resolution: int | None = None,
    scaling: str = "official",
    path_column: str = "path",
    label_column: str = "label",
    resume: bool | str = False,
    save_every_steps: int | None = None,
    device="auto",
    precision: str = "auto",
    channels_last: bool | None = None,
    compile: bool = False,
    sync_bn: bool = False,
    num_workers: int | None = None,
    seed: int = 0,
    verbose: int = 1,
    **overrides: Any,
) -> PretrainResult:
    """Pretrain an EfficientNet classifier on labelled images; write an effsk checkpoint.

    Parameters
    ----------
    data : str or path
        An ImageFolder-style directory (one sub-folder per class) or a CSV/parquet table with
        ``path_column`` (paths relative to the table's directory or absolute) and ``label_column``.
    output_dir : str or path
        Where the run lives (see the module docstring for its files).
    phi : str, float or Scaling, default="b0"
        The variant (see :func:`effsk.scaling.resolve`); ``None`` with a checkpoint ``weights`` takes
        the checkpoint's.
    recipe : {"modern", "paper"} or Recipe
        The settings (:data:`RECIPES`); ``**overrides`` change any of them (``Recipe.names()``), e.g.
        ``optimizer="sgd"``, ``warmup_epochs=0``, ``ema_decay=None``, ``augment="light"``.
    val_data : str or path, optional
        A validation directory or table (same classes). Otherwise ``val_fraction`` of ``data`` is
        held out (stratified); ``0`` trains on everything and reports no validation metrics.
    weights : None, "imagenet" or path
        Start from random weights, the published ImageNet weights, or a checkpoint (continue).
    epochs, lr : optional
        Override the recipe's epochs and the learning rate (default ``recipe.lr_for(batch_size)``).
    batch_size : int, default=256
        The global batch: under torchrun each of the N processes takes ``batch_size / N``.
    resolution : int, optional
        Training and evaluation crop size (default: the variant's).
    scaling : {"official", "compound"}
        How ``phi`` resolves.
    resume : bool or "auto", default=False
        ``True``: continue the run in ``output_dir`` (it must exist) from its last saved state, mid-epoch
        included; settings must match the original run's (the number of processes may change as long
        as the global batch does not). ``"auto"``: resume if a state exists, else start. ``False``:
        start, refusing an ``output_dir`` that already holds a run. On several nodes, ``output_dir``
        must be on a filesystem every node sees: rank 0 writes, every rank reads the state.
    save_every_steps : int, optional
        Also save the training state every this many optimiser steps (it is saved every epoch).
    device, precision : str
        As :func:`effsk.utils.runtime.resolve_device` / :func:`~effsk.utils.runtime.resolve_precision` (``"auto"``:
        bf16/fp16 autocast on GPUs, fp32 on CPU). Under torchrun each process takes ``cuda:LOCAL_RANK``.
    channels_last : bool, optional
        Default: where it trains faster (:func:`effsk.utils.runtime.prefers_channels_last`).
    compile : bool, default=False
        ``torch.compile`` the training forward pass.
    sync_bn : bool, default=False
        Under torchrun on GPUs, use SyncBatchNorm (statistics over the global batch).
    num_workers : int, optional
        DataLoader workers per process (default: as many as suit the machine, none on two cores or
        fewer; see :func:`effsk.data.gpu_decode.resolve_num_workers`). With
        workers, a mid-epoch resume replays the same images but not the same random augmentations.
    seed : int
        Seeds initialisation, the validation split, shuffling and augmentation.
    verbose : int
        ``>= 1``: progress bars and a line per epoch (rank 0 only).

    Raises
    ------
    ValueError
        A setting out of its range (scikit-learn's ``InvalidParameterError``, which names it), a
        validation split that cannot be made, or a batch that the images or processes cannot fill;
        ``TypeError`` for an unknown recipe setting in ``**overrides``.

    Returns
    -------
    PretrainResult
        ``checkpoint`` (the effsk checkpoint path), ``history`` (per-epoch records), and the paths of
        the metrics CSV, the curves PNG and the training state.

    Examples
    --------
    >>> result = pretrain("imagenet/train", val_data="imagenet/val", output_dir="runs/b0",
    ...                   recipe="paper", batch_size=1024)  # doctest: +SKIP
    >>> features = EfficientNetFeaturizer("b0", weights=result.checkpoint).fit_transform(paths)  # doctest: +SKIP
    """
    recipe = get_recipe(recipe, **({"epochs": epochs} if epochs is not None else {}), **overrides)
    if weights is not None and "bn_eps" in overrides:
        raise ValueError("bn_eps applies to models trained from scratch; loaded weights keep their own eps")
    env = distributed.from_environ()
    device = _process_device(device, env, sync_bn)
    files = RunFiles(os.path.abspath(os.fspath(output_dir)))
    resuming = _resuming(files, resume)
    train, val = _datasets(data, val_data, val_fraction, path_column=path_column, label_column=label_column, seed=seed)
    _check_batches(train, val, batch_size, env)
    spec = _ModelSpec(phi=phi, weights=weights, scaling=scaling, resolution=resolution, sync_bn=bool(sync_bn),
                      compile=bool(compile))
    run = _RunSpec(
        recipe=recipe, batch_size=batch_size, per_rank_batch=batch_size // env.world_size,
        lr=recipe.lr_for(batch_size) if lr is None else float(lr), device=device, precision=precision,
        channels_last=channels_last, num_workers=resolve_num_workers("auto" if num_workers is None else num_workers, device),
        seed=int(seed), verbose=int(verbose), save_every_steps=save_every_steps, resuming=resuming,
        sources={"data": _describe(data), "val_data": _describe(val_data)},
    )
    started_here = env.is_distributed and not distributed.is_initialized()
    env = distributed.setup(device.type)
    try:
        with _cudnn_benchmark(device):
            return _run(train, val, files, env, spec, run)
    finally:
        if started_here:
            distributed.teardown()
