"""The pretraining path: train an EfficientNet backbone on a labelled image collection.

:func:`pretrain` trains from scratch (or continues from weights) with a recipe: ``"paper"`` (Tan & Le's
ImageNet recipe, REFERENCE.md) or ``"modern"`` (AdamW, cosine, RandAugment); every recipe value can be
overridden. It runs the one training loop (:class:`effsk.training.Trainer`), on one device or
data-parallel under ``torchrun`` (DistributedDataParallel, NCCL on GPUs, gloo on CPU).

An output directory holds the run::

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
import glob
import hashlib
import json
import os
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from . import distributed
from ..data.transforms import AUGMENT_PRESETS, train_transform
from ..weights.checkpoint import atomic_torch_save, read_weights_file, save_checkpoint
from ..data.datasets import TABLE_EXTENSIONS, LabelledImages, image_folder, image_table
from ..utils.fileio import atomic_write
from ..data.images import make_loader
from ..data.transforms import eval_transform
from .runlog import RunLog
from ..utils.runtime import resolve_device
from .loop import Callback, TrainConfig, Trainer, top_k_accuracy

__all__ = ["Recipe", "RECIPES", "get_recipe", "PretrainResult", "pretrain", "CHECKPOINT_FILE", "STATE_FILE"]

CHECKPOINT_FILE = "model.pt"
STATE_FILE = "train_state.pt"
RUN_FILE = "run.json"
STATE_FORMAT = "effsk.pretrain-state"
STATE_FORMAT_VERSION = 1


@dataclass(frozen=True)
class Recipe:
    """Every setting of a pretraining recipe (see :data:`RECIPES`).

    The learning rate is ``lr_per_256 * batch_size / 256`` (linear scaling with the global batch,
    as the TF reference scales it). Fields shared with :class:`effsk.training.TrainConfig` mean the
    same there; the others:

    epochs : int
    augment : str
        A preset of :func:`effsk.data.transforms.train_transform`.
    drop_rate : float or None
        Classifier dropout; ``None`` takes the variant's (0.2 for B0 up to 0.5 for B7).
    drop_path_rate : float
        Stochastic depth of the last block.
    bn_momentum, bn_eps : float or None
        BatchNorm settings (PyTorch convention: momentum 0.01 is TF's decay 0.99); ``None`` keeps the
        variant's. ``bn_eps`` applies only to models trained from scratch: loaded weights keep the
        eps they were trained with, which is part of the function they compute.

    >>> paper = RECIPES["paper"]
    >>> paper.optimizer, paper.lr_for(4096), paper.decay_rate, paper.decay_epochs
    ('rmsprop', 0.256, 0.97, 2.4)
    >>> paper.replace(epochs=90).epochs
    90
    """

    optimizer: str
    lr_per_256: float
    weight_decay: float
    schedule: str
    warmup_epochs: float
    epochs: int
    label_smoothing: float
    ema_decay: float | None
    augment: str
    drop_path_rate: float
    drop_rate: float | None = None
    ema_warmup: bool = True
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.999)
    rmsprop_decay: float = 0.9
    eps: float | None = None
    min_lr: float = 0.0
    decay_epochs: float = 2.4
    decay_rate: float = 0.97
    clip_grad_norm: float | None = None
    bn_momentum: float | None = None
    bn_eps: float | None = None
    precise_bn_batches: int = 0
    freeze: str | int = "none"
    early_stopping: bool = False
    patience: int = 5
    monitor: str = "val_loss"
    min_delta: float = 0.0

    def __post_init__(self):
        if self.augment not in AUGMENT_PRESETS:
            raise ValueError(f"augment={self.augment!r}; use one of {AUGMENT_PRESETS}")
        if self.lr_per_256 <= 0 or self.epochs < 1:
            raise ValueError(f"need lr_per_256 > 0 and epochs >= 1, got {self.lr_per_256}, {self.epochs}")
        for name in ("drop_path_rate", "drop_rate"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < 1:
                raise ValueError(f"{name}={value!r} must lie in [0, 1)")
        object.__setattr__(self, "betas", tuple(self.betas))
        self.train_config(lr=1.0)  # TrainConfig validates the settings it shares

    def replace(self, **changes) -> "Recipe":
        """A copy with ``changes``; unknown names are an error that lists the valid ones."""
        unknown = sorted(set(changes) - set(self.names()))
        if unknown:
            raise TypeError(f"unknown recipe setting(s) {unknown}; valid settings: {', '.join(self.names())}")
        return replace(self, **changes)

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def lr_for(self, batch_size: int) -> float:
        """The learning rate for a global batch of ``batch_size`` images."""
        return self.lr_per_256 * batch_size / 256

    def train_config(self, *, lr: float, **runtime) -> TrainConfig:
        """The :class:`TrainConfig` of this recipe at learning rate ``lr``."""
        shared = {f.name for f in fields(TrainConfig)} & set(self.names())
        return TrainConfig(max_epochs=self.epochs, lr=lr, **{k: getattr(self, k) for k in shared}, **runtime)


RECIPES: dict[str, Recipe] = {
    # Tan & Le 2019 and the TF reference (REFERENCE.md): RMSProp (decay 0.9, momentum 0.9, eps 1e-3),
    # lr 0.016 per 256 images x0.97 every 2.4 epochs after 5 warm-up epochs, weight decay 1e-5, label
    # smoothing 0.1, weight EMA 0.9999 (with TF's ramp), AutoAugment, stochastic depth 0.2, the
    # variant's dropout, BatchNorm decay 0.99 / eps 1e-3, ~350 epochs.
    "paper": Recipe(
        optimizer="rmsprop",
        lr_per_256=0.016,
        weight_decay=1e-5,
        schedule="step",
        warmup_epochs=5,
        epochs=350,
        label_smoothing=0.1,
        ema_decay=0.9999,
        augment="autoaugment",
        drop_path_rate=0.2,
        momentum=0.9,
        rmsprop_decay=0.9,
        eps=1e-3,
        decay_epochs=2.4,
        decay_rate=0.97,
        bn_momentum=0.01,
        bn_eps=1e-3,
    ),
    # The DeiT / ConvNeXt ImageNet recipe family: AdamW at 5e-4 per 512 images (4e-3 at 4096), weight
    # decay 0.05, 5 warm-up epochs then cosine to 1e-6, label smoothing 0.1, RandAugment (2 ops,
    # magnitude 9), weight EMA 0.9999, 300 epochs; EfficientNet's stochastic depth 0.2.
    "modern": Recipe(
        optimizer="adamw",
        lr_per_256=2.5e-4,
        weight_decay=0.05,
        schedule="cosine",
        warmup_epochs=5,
        epochs=300,
        label_smoothing=0.1,
        ema_decay=0.9999,
        augment="randaugment",
        drop_path_rate=0.2,
        min_lr=1e-6,
    ),
}


def get_recipe(recipe: str | Recipe = "modern", **overrides) -> Recipe:
    """A recipe by name (or as given) with ``overrides`` applied.

    >>> get_recipe("paper", epochs=10, augment="light").epochs
    10
    """
    if isinstance(recipe, str):
        if recipe not in RECIPES:
            raise ValueError(f"recipe={recipe!r}; use one of {sorted(RECIPES)} or a Recipe")
        recipe = RECIPES[recipe]
    elif not isinstance(recipe, Recipe):
        raise TypeError(f"recipe must be a name or a Recipe, got {type(recipe).__name__}")
    return recipe.replace(**overrides)


@dataclass
class PretrainResult:
    """What :func:`pretrain` produced: the final effsk checkpoint and the per-epoch history."""

    checkpoint: str
    history: list[dict]
    output_dir: str
    metrics: str
    plot: str | None
    state: str


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


def _split(images: LabelledImages, fraction: float, seed: int) -> tuple[LabelledImages, LabelledImages]:
    from sklearn.model_selection import train_test_split

    try:
        train_idx, val_idx = train_test_split(
            np.arange(len(images)), test_size=fraction, stratify=images.labels, random_state=seed
        )
    except ValueError as exc:
        raise ValueError(
            f"cannot hold out val_fraction={fraction} of {len(images)} images stratified by class: {exc} "
            "Pass val_data, a larger val_fraction, or val_fraction=0."
        ) from None
    return _subset(images, np.sort(train_idx)), _subset(images, np.sort(val_idx))


def _fingerprint(images: LabelledImages | None) -> dict | None:
    if images is None:
        return None
    digest = hashlib.sha256()
    for path, label in zip(images.paths, images.labels):
        digest.update(f"{path}\t{label}\n".encode())
    return {"images": len(images), "sha256": digest.hexdigest()}


# -- model --------------------------------------------------------------------------------------------


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


# -- the run ------------------------------------------------------------------------------------------


def _plain(value):
    """JSON round trip: tuples become lists, so stored and requested settings compare equal."""
    return json.loads(json.dumps(value, default=str))


class _RunFiles:
    def __init__(self, output_dir: str):
        self.dir = output_dir
        self.checkpoint = os.path.join(output_dir, CHECKPOINT_FILE)
        self.state = os.path.join(output_dir, STATE_FILE)
        self.run = os.path.join(output_dir, RUN_FILE)
        self.log = RunLog(output_dir)

    def remove_partial_writes(self) -> None:
        """Delete temporary files a killed run left behind (atomic writes in progress)."""
        for name in (CHECKPOINT_FILE, STATE_FILE):
            for leftover in glob.glob(os.path.join(glob.escape(self.dir), f".{name}.*.tmp")):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(leftover)


class _PretrainCallback(Callback):
    """Top-k metrics, the run log, and the resumable training state (written by rank 0)."""

    def __init__(self, files: _RunFiles, signature: dict, env: distributed.DistEnv, save_every_steps: int | None):
        self.files, self.signature, self.env = files, signature, env
        self.save_every_steps = save_every_steps

    def on_validation_end(self, trainer, outputs, targets, record):
        record["val_top1"] = top_k_accuracy(outputs, targets, 1)
        record["val_top5"] = top_k_accuracy(outputs, targets, 5)

    def on_step_end(self, trainer, loss):
        every = self.save_every_steps
        # the epoch's last step is saved at the epoch's end, with its metrics
        if every and trainer.step % every == 0 and trainer.step_in_epoch < trainer.steps_per_epoch:
            self.save_state(trainer)

    def on_epoch_end(self, trainer, record):
        # every rank measured its own share; the ranks run in lockstep, so the global rate is world x
        record["images_per_second"] *= self.env.world_size
        record["step"] = trainer.step
        self.save_state(trainer)
        if self.env.is_main:
            self.files.log.append(record)
            self.files.log.plot()

    def save_state(self, trainer: Trainer) -> None:
        """Write the training state atomically; every rank contributes its RNG and loss tally."""
        state = trainer.state_dict()
        ranks = distributed.all_gather_objects(
            {"rng": state["rng"], "epoch_loss": state["epoch_loss"], "epoch_count": state["epoch_count"]}
        )
        if self.env.is_main:
            atomic_torch_save(
                {
                    "format": STATE_FORMAT,
                    "format_version": STATE_FORMAT_VERSION,
                    "run": self.signature,
                    "world_size": self.env.world_size,
                    "ranks": ranks,
                    "trainer": state,
                },
                self.files.state,
            )


def _read_state(path: str, signature: dict) -> dict:
    state = read_weights_file(path)
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ValueError(f"{path!r} is not an effsk pretraining state file")
    if state.get("format_version", 0) > STATE_FORMAT_VERSION:
        raise ValueError(f"{path!r} was written by a newer effsk (state format {state['format_version']}); upgrade effsk")
    stored = state["run"]
    differing = [k for k in sorted(set(stored) | set(signature)) if stored.get(k) != signature.get(k)]
    if differing:
        details = []
        for key in differing:
            old, new = stored.get(key), signature.get(key)
            if isinstance(old, dict) and isinstance(new, dict):
                sub = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
                details += [f"{key}.{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sub]
            else:
                details.append(f"{key}: {old!r} -> {new!r}")
        raise ValueError(
            f"cannot resume from {path!r}: the run was started with other settings ({'; '.join(details)}). "
            "Resume with the original settings, or start a new run in another output_dir "
            "(weights=<model.pt> continues from its weights)."
        )
    return state


def _load_into_trainer(trainer: Trainer, state: dict, env: distributed.DistEnv) -> None:
    trainer_state = dict(state["trainer"])
    ranks = state["ranks"]
    if len(ranks) == env.world_size:
        mine = ranks[env.rank]
    else:
        # another number of processes: the epoch's loss tally so far all goes to rank 0
        mine = {
            "rng": ranks[min(env.rank, len(ranks) - 1)]["rng"],
            "epoch_loss": sum(r["epoch_loss"] for r in ranks) if env.is_main else 0.0,
            "epoch_count": sum(r["epoch_count"] for r in ranks) if env.is_main else 0,
        }
    trainer_state.update(mine)
    trainer.load_state_dict(trainer_state)


def _sync_log(log: RunLog, history: list[dict]) -> None:
    """Make the log hold exactly the epochs of ``history`` (drops epochs logged after the state)."""
    log.truncate_after(len(history) - 1)
    logged = {r.get("epoch") for r in log.records()}
    for record in history:
        if record["epoch"] not in logged:
            log.append(record)


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


def _default_workers(env: distributed.DistEnv) -> int:
    per_process = max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", env.world_size)))
    return min(8, per_process // 2)


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
        Default: on CUDA only.
    compile : bool, default=False
        ``torch.compile`` the training forward pass.
    sync_bn : bool, default=False
        Under torchrun on GPUs, use SyncBatchNorm (statistics over the global batch).
    num_workers : int, optional
        DataLoader workers per process (default: half the cores per process, at most 8). With
        workers, a mid-epoch resume replays the same images but not the same random augmentations.
    seed : int
        Seeds initialisation, the validation split, shuffling and augmentation.
    verbose : int
        ``>= 1``: progress bars and a line per epoch (rank 0 only).

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
    from ..weights.build import build_model

    recipe = get_recipe(recipe, **({"epochs": epochs} if epochs is not None else {}), **overrides)
    if resume not in (False, True, "auto"):
        raise ValueError(f"resume={resume!r}; use False, True or 'auto'")
    if not isinstance(batch_size, int) or batch_size < 2:
        raise ValueError(f"batch_size={batch_size!r} must be an int >= 2")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction!r} must lie in [0, 1)")
    if save_every_steps is not None and save_every_steps < 1:
        raise ValueError(f"save_every_steps={save_every_steps!r} must be >= 1")
    if lr is not None and lr <= 0:
        raise ValueError(f"lr={lr!r} must be > 0")
    if weights is not None and "bn_eps" in overrides:
        raise ValueError("bn_eps applies to models trained from scratch; loaded weights keep their own eps")

    env = distributed.from_environ()
    device = resolve_device(device)
    if env.is_distributed:
        if device.type == "cuda":
            device = torch.device("cuda", env.local_rank)
        elif device.type != "cpu":
            raise ValueError(f"distributed pretraining runs on CUDA (NCCL) or CPU (gloo), not {device.type}")
        if sync_bn and device.type != "cuda":
            raise ValueError("sync_bn=True needs CUDA devices: torch's SyncBatchNorm does not run on CPU")
    if batch_size % env.world_size:
        raise ValueError(f"batch_size={batch_size} (the global batch) must be divisible by the {env.world_size} processes")
    per_rank_batch = batch_size // env.world_size

    files = _RunFiles(os.path.abspath(os.fspath(output_dir)))
    has_state = os.path.exists(files.state)
    if resume is True and not has_state:
        raise FileNotFoundError(f"resume=True but {files.state!r} does not exist: there is no run to resume there")
    if resume is False and has_state:
        raise FileExistsError(
            f"{files.dir!r} already holds a run ({STATE_FILE}); pass resume=True to continue it or choose another output_dir"
        )
    resuming = has_state and resume in (True, "auto")

    train = load_images(data, path_column=path_column, label_column=label_column)
    val = None
    if val_data is not None:
        val = load_images(val_data, path_column=path_column, label_column=label_column, classes=train.classes)
    elif val_fraction > 0:
        train, val = _split(train, val_fraction, seed)
    if len(train) // env.world_size < per_rank_batch:
        raise ValueError(f"{len(train)} training images cannot fill one global batch of {batch_size}; use a smaller batch_size")
    if val is not None and len(val) < env.world_size:
        raise ValueError(f"{len(val)} validation images for {env.world_size} processes: every process needs at least one")

    started_here = env.is_distributed and not distributed.is_initialized()
    env = distributed.setup(device.type)
    try:
        with _cudnn_benchmark(device):
            return _run(
                train, val, files=files, env=env, device=device, build_model=build_model, phi=phi, weights=weights,
                scaling=scaling, recipe=recipe, batch_size=batch_size, per_rank_batch=per_rank_batch,
                lr=recipe.lr_for(batch_size) if lr is None else float(lr), resolution=resolution,
                resuming=resuming, save_every_steps=save_every_steps, precision=precision,
                channels_last=channels_last, compile=compile, sync_bn=sync_bn,
                num_workers=_default_workers(env) if num_workers is None else int(num_workers),
                seed=int(seed), verbose=int(verbose), data=data, val_data=val_data,
            )
    finally:
        if started_here:
            distributed.teardown()


def _run(train, val, *, files, env, device, build_model, phi, weights, scaling, recipe, batch_size, per_rank_batch,
         lr, resolution, resuming, save_every_steps, precision, channels_last, compile, sync_bn, num_workers, seed,
         verbose, data, val_data) -> PretrainResult:
    torch.manual_seed(seed)  # the same initial weights on every rank
    model, preprocessing = build_model(
        phi, weights, num_classes=len(train.classes), scaling=scaling, drop_rate=recipe.drop_rate,
        drop_path_rate=recipe.drop_path_rate, progress=env.is_main and verbose > 0,
    )
    _set_batchnorm(model, momentum=recipe.bn_momentum, eps=recipe.bn_eps if weights is None else None)
    if resolution is not None:
        preprocessing = preprocessing.with_resolution(int(resolution))
    if sync_bn and env.is_distributed:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    torch.manual_seed(seed + env.rank)  # dropout, stochastic depth and augmentation differ per rank

    pin = device.type == "cuda"
    generator = torch.Generator()
    train_loader = make_loader(
        train.paths, preprocessing, transform=train_transform(preprocessing, recipe.augment), targets=train.labels,
        batch_size=per_rank_batch, num_workers=num_workers, pin_memory=pin, generator=generator, drop_last=True,
        sampler=distributed.ResumableDistributedSampler(
            range(len(train)), num_replicas=env.world_size, rank=env.rank, shuffle=True, seed=seed, drop_last=True
        ),
    )
    val_loader = None
    if val is not None:
        val_loader = make_loader(
            val.paths, preprocessing, transform=eval_transform(preprocessing), targets=val.labels,
            batch_size=per_rank_batch, num_workers=num_workers, pin_memory=pin,
            sampler=distributed.ShardSampler(len(val), env.world_size, env.rank),
        )

    signature = _plain({
        "arch": model.scaling.as_dict(),
        "num_classes": len(train.classes),
        "classes": train.classes,
        "train": _fingerprint(train),
        "val": _fingerprint(val),
        "batch_size": batch_size,
        "lr": lr,
        "preprocessing": preprocessing.to_dict(),
        "recipe": asdict(recipe),
        "seed": seed,
    })
    config = recipe.train_config(
        lr=lr, device=device, precision=precision, channels_last=channels_last,
        # worker seeds: per epoch (so a resumed epoch replays them) and per rank
        seed=seed + 1_000_003 * env.rank, verbose=verbose,
    )

    def wrap(module: nn.Module) -> nn.Module:
        if env.is_distributed:
            module = nn.parallel.DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)
        return torch.compile(module) if compile else module

    callback = _PretrainCallback(files, signature, env, save_every_steps)
    trainer = Trainer(
        model, train_loader, val_loader, config, callbacks=[callback], wrap_model=wrap,
        gather=distributed.all_gather_cat if env.is_distributed else None,
        sync_buffers=distributed.average_buffers if env.is_distributed else None,
        main_process=env.is_main,
    )
    if resuming:
        _load_into_trainer(trainer, _read_state(files.state, signature), env)
    if env.is_main:
        os.makedirs(files.dir, exist_ok=True)
        files.remove_partial_writes()
        _sync_log(files.log, trainer.history)
        run = {"data": os.fspath(data) if not isinstance(data, LabelledImages) else "<LabelledImages>",
               "val_data": None if val_data is None else os.fspath(val_data) if not isinstance(val_data, LabelledImages) else "<LabelledImages>",
               "world_size": env.world_size, "per_process_batch": per_rank_batch, "device": str(device),
               "precision": precision, "num_workers": num_workers, "compile": compile, "sync_bn": sync_bn,
               "steps_per_epoch": trainer.steps_per_epoch, **signature}
        with atomic_write(files.run, "w") as fh:
            json.dump(run, fh, indent=2)

    history = trainer.fit()
    distributed.check_same_across_ranks(trainer.module)
    plot = None
    if env.is_main:
        last = history[-1] if history else {}
        metadata = {
            "pretrain": {
                "recipe": asdict(recipe), "lr": lr, "batch_size": batch_size, "world_size": env.world_size,
                "epochs": trainer.epoch, "steps": trainer.step, "train_images": len(train),
                "val_images": 0 if val is None else len(val),
                "final": {k: v for k, v in last.items() if isinstance(v, (int, float))},
            },
        }
        save_checkpoint(files.checkpoint, trainer.module, preprocessing, classes=train.classes, metadata=metadata)
        plot = files.log.plot()
    distributed.barrier()
    return PretrainResult(
        checkpoint=files.checkpoint, history=history, output_dir=files.dir, metrics=files.log.csv,
        plot=plot if plot is not None else (files.log.png if os.path.exists(files.log.png) else None),
        state=files.state,
    )
