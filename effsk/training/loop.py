"""The one training loop, shared by fine-tuning (the estimators) and pretraining.

Its settings live in :mod:`.config` (:class:`TrainConfig`), what it does to models besides optimiser
steps (freezing, evaluation, precise BN) in :mod:`.model_ops`; both are re-exported here.

:class:`Trainer` owns a model, its optimiser, schedule, grad scaler and optional weight EMA, and runs
epochs of ``(inputs, targets)`` batches with per-epoch validation, early stopping that restores the
best weights, and callbacks. Its :meth:`Trainer.state_dict` holds the whole training state, so a
checkpoint written from a callback resumes exactly, mid-epoch included.

Scale-out is layered on, not built in: pass ``wrap_model`` (e.g. wrap in DistributedDataParallel),
a loader with a ``DistributedSampler`` (its ``set_epoch`` is called every epoch), ``gather`` (an
all-gather along dim 0, used to reduce training loss and to collect validation outputs),
``sync_buffers`` (e.g. average BatchNorm statistics over ranks) and ``main_process=False`` on ranks
that must stay quiet.

Resuming mid-epoch replays the epoch's batch order and skips the batches already done. A sampler
with ``set_start_index(i)`` (such as :class:`effsk.training.distributed.ResumableDistributedSampler`) skips
them without loading; with any other loader they are loaded and dropped.

Checkpoint and resume with a callback (write atomically: temp file, fsync, ``os.replace``)::

    class Checkpoint(Callback):
        def on_epoch_end(self, trainer, record):      # or on_step_end, every N steps
            save_atomically(trainer.state_dict(), path)

    trainer = Trainer(model, train_loader, val_loader, config, callbacks=[Checkpoint()])
    trainer.load_state_dict(torch.load(path, weights_only=True))   # when resuming
    trainer.fit()

Extra validation metrics (top-5, say) go in through ``Callback.on_validation_end``, which may add keys
to the epoch's record.
"""

from __future__ import annotations

import copy
import math
import time
from typing import Callable, Iterable, Sequence

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from ..utils.runtime import autocast, explain_oom, prefers_channels_last, resolve_device, resolve_precision
from .config import AVERAGED_BN_IMAGES, AVERAGED_BN_VALUES, FREEZE_MODES, PRECISE_BN_VALUES, TrainConfig
from .model_ops import (
    BatchNormAverage,
    PooledHead,
    apply_freeze,
    deepest_positions,
    ema_warmup_avg_fn,
    evaluate,
    recalibrate_bn,
    to_device,
    top_k_accuracy,
    trained_batchnorms,
)
from .optim import build_optimizer, build_scheduler, layerwise_lr_scale

__all__ = ["Callback", "Trainer"]


class Callback:
    """Hooks into :class:`Trainer`; override what you need. Set ``trainer.should_stop = True`` to end
    training after the current epoch. ``on_epoch_end`` runs after the epoch's state is complete
    (``trainer.epoch`` already counts it), so a checkpoint written there resumes at the next epoch."""

    def on_fit_start(self, trainer: "Trainer") -> None: ...

    def on_epoch_start(self, trainer: "Trainer") -> None: ...

    def on_step_end(self, trainer: "Trainer", loss: torch.Tensor) -> None: ...

    def on_validation_end(self, trainer: "Trainer", outputs: torch.Tensor, targets, record: dict) -> None: ...

    def on_epoch_end(self, trainer: "Trainer", record: dict) -> None: ...

    def on_fit_end(self, trainer: "Trainer") -> None: ...


class Trainer:
    """Train ``model`` on ``train_loader`` batches of ``(inputs, targets)``.

    Parameters
    ----------
    model : nn.Module
        Moved to the configured device (channels_last where that trains faster, see
        ``config.channels_last``); its ``requires_grad`` flags are set by ``config.freeze``.
    train_loader, val_loader : iterable of (inputs, targets)
        ``val_loader`` is optional unless early stopping is on.
    config : TrainConfig
    loss_fn : callable ``(outputs, targets) -> scalar tensor``, optional
        Defaults to cross-entropy with ``config.label_smoothing``. Validation loss is
        ``loss_fn(all_outputs, all_targets)`` computed on the CPU in fp32.
    metric_fn : callable ``(outputs, targets) -> float``, optional
        Validation score, higher is better (default with the default loss: top-1 accuracy).
    callbacks : sequence of Callback
    wrap_model : callable, optional
        Applied to the (device-placed) model for the training forward pass, e.g. a
        DistributedDataParallel constructor. Freezing, EMA, checkpoints and evaluation use the
        unwrapped module.
    gather : callable, optional
        All-gather along dim 0 across processes (identity when None).
    sync_buffers : callable, optional
        ``sync_buffers(module)`` makes a module's buffers agree across processes (e.g. averages
        BatchNorm running statistics over ranks). Called on the model and the EMA after each
        epoch's training steps and after precise BN, before validation.
    main_process : bool
        Only the main process shows progress.
    head_only : bool
        The loaders' inputs are the backbone's pooled features
        (:class:`~effsk.training.model_ops.BackboneFeatures`), not images: training and validation
        run the model's head alone on them (:class:`~effsk.training.model_ops.PooledHead`). Needs
        ``config.freeze="backbone"``, under which the backbone would compute the same features.

    Examples
    --------
    >>> import torch
    >>> from torch.utils.data import DataLoader, TensorDataset
    >>> g = torch.Generator().manual_seed(0)
    >>> x = torch.randn(64, 4, generator=g); y = (x[:, 0] > 0).long()
    >>> loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True, generator=g)
    >>> torch.manual_seed(0) and None
    >>> trainer = Trainer(torch.nn.Linear(4, 2), loader, loader, TrainConfig(max_epochs=5, lr=0.1, device="cpu", seed=0))
    >>> history = trainer.fit()
    >>> len(history), history[-1]["val_score"] > 0.9
    (5, True)
    """

    def __init__(
        self,
        model: nn.Module,
        train_loader: Iterable,
        val_loader: Iterable | None = None,
        config: TrainConfig | None = None,
        *,
        loss_fn: Callable | None = None,
        metric_fn: Callable | None = None,
        callbacks: Sequence[Callback] = (),
        wrap_model: Callable[[nn.Module], nn.Module] | None = None,
        gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
        sync_buffers: Callable[[nn.Module], None] | None = None,
        main_process: bool = True,
        head_only: bool = False,
    ):
        self.config = config = config or TrainConfig()
        if config.early_stopping and val_loader is None:
            raise ValueError("early_stopping needs a val_loader")
        if head_only and config.freeze != "backbone":
            raise ValueError(f"head_only=True trains the head alone, so it needs freeze='backbone', not {config.freeze!r}")
        self.head_only = head_only
        if config.monitor == "val_score" and metric_fn is None and loss_fn is not None:
            raise ValueError("monitor='val_score' needs a metric_fn")
        self.device = resolve_device(config.device)
        self.amp_dtype = resolve_precision(config.precision, self.device)
        self.channels_last = prefers_channels_last(self.device) if config.channels_last is None else bool(config.channels_last)
        self.train_loader, self.val_loader = train_loader, val_loader
        if loss_fn is None:
            loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
            metric_fn = metric_fn or top_k_accuracy
        self.loss_fn, self.metric_fn = loss_fn, metric_fn
        self.callbacks = list(callbacks)
        self.gather, self.sync_buffers, self.main_process = gather, sync_buffers, main_process
        self._place_model(model, wrap_model)
        self._build_optimization()
        self._reset_progress()

    def _place_model(self, model: nn.Module, wrap_model) -> None:
        """Device and memory format, freezing, the EMA copy, and the wrapper for the forward pass."""
        memory_format = torch.channels_last if self.channels_last else torch.preserve_format
        self.module = model.to(self.device, memory_format=memory_format)
        self._held_in_eval = apply_freeze(self.module, self.config.freeze)
        held = {id(m) for m in self._held_in_eval}
        self._held_names = [name for name, m in self.module.named_modules() if id(m) in held]
        self.ema = None
        if self.config.ema_decay is not None:
            decay = self.config.ema_decay
            average = ema_warmup_avg_fn(decay) if self.config.ema_warmup else get_ema_multi_avg_fn(decay)
            self.ema = AveragedModel(self.module, multi_avg_fn=average, use_buffers=True)
        # Precise BN for free where the training batches allow it (see _averages_bn). Not under an EMA,
        # which would average the restarted statistics into its own.
        self._bn_average = None
        if self.config.precise_bn_batches > 0 and self.ema is None:
            self._bn_average = BatchNormAverage(trained_batchnorms(self.module, self._held_names))
        self._bn_min_images: int | None = None  # images per precise-BN pass, once the first batch is seen
        self._bn_window = self.config.precise_bn_batches  # the last batches of an epoch averaged on the fly
        forward = PooledHead(self.module) if self.head_only else self.module
        self.model = wrap_model(forward) if wrap_model is not None else forward

    def _build_optimization(self) -> None:
        """Optimiser, per-step schedule and grad scaler for the trainable parameters."""
        config = self.config
        self.steps_per_epoch = int(config.steps_per_epoch or len(self.train_loader))
        if self.steps_per_epoch < 1:
            raise ValueError("the training loader yields no batches")
        self.optimizer = build_optimizer(
            self.module, config.optimizer, lr=config.lr, weight_decay=config.weight_decay, momentum=config.momentum,
            betas=tuple(config.betas), rmsprop_decay=config.rmsprop_decay, eps=config.eps,
            lr_scale=layerwise_lr_scale(self.module, config.backbone_lr_scale, config.layer_decay),
        )
        self.scheduler = build_scheduler(
            self.optimizer, config.schedule, steps_per_epoch=self.steps_per_epoch, epochs=config.max_epochs,
            warmup_epochs=config.warmup_epochs, min_lr=config.min_lr, decay_epochs=config.decay_epochs,
            decay_rate=config.decay_rate,
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.trainable = [p for p in self.module.parameters() if p.requires_grad]
        self.last_lr = self.optimizer.param_groups[0]["lr"]

    def _reset_progress(self) -> None:
        self.epoch = 0  # completed epochs
        self.step = 0  # optimiser steps
        self.step_in_epoch = 0
        self.history: list[dict] = []
        self.best_value: float | None = None
        self.best_epoch: int | None = None
        self.bad_epochs = 0
        self.best_state: dict | None = None
        self.should_stop = False
        self._loss_sum = torch.zeros((), device=self.device)  # training loss x images, this epoch
        self._epoch_count = 0
        self._pending_rng: dict | None = None

    # -- training ----------------------------------------------------------------------------------

    @property
    def evaluated_module(self) -> nn.Module:
        """The weights validation sees (and the model ends with): the EMA when there is one."""
        return self.ema.module if self.ema is not None else self.module

    def train_mode(self) -> None:
        """``train()`` for the model, except the modules the freeze mode holds in eval mode."""
        self.model.train()
        for m in self._held_in_eval:
            m.eval()

    def fit(self) -> list[dict]:
        """Run epochs ``self.epoch .. max_epochs - 1`` (fewer if stopped early); return the history."""
        self._callback("on_fit_start")
        while self.epoch < self.config.max_epochs and not self.should_stop:
            record = self._run_epoch()
            self._update_early_stopping(record)
            self.history.append(record)
            self.epoch += 1
            self.step_in_epoch = 0
            self._loss_sum.zero_()
            self._epoch_count = 0
            if self.config.verbose and self.main_process:
                tqdm.write(_format_record(record, self.config))
            self._callback("on_epoch_end", record)
        self._finish()
        self._callback("on_fit_end")
        return self.history

    def _run_epoch(self) -> dict:
        self._seed_epoch()
        self._callback("on_epoch_start")
        self.train_mode()
        start = time.perf_counter()
        batches = self._remaining_batches()
        if self._pending_rng is not None:  # after skipping, so the skipped batches' augmentation is replayed
            _set_rng_state(self._pending_rng)
            self._pending_rng = None
        bar = tqdm(
            total=self.steps_per_epoch,
            initial=self.step_in_epoch,
            desc=self.config.epoch_label(self.epoch),
            leave=False,
            disable=not (self.config.verbose and self.main_process),
        )
        images, averaging = 0, False
        for batch in batches:
            if self.step_in_epoch >= self.steps_per_epoch:
                break
            inputs = to_device(batch[0], self.device, self.channels_last)
            averaging = averaging or self._start_bn_average(inputs)
            targets = to_device(batch[1], self.device)
            loss = self._train_step(inputs, targets)
            n = inputs.shape[0]
            self._loss_sum += loss.detach().float() * n  # stays on the device: no host sync per step
            self._epoch_count += n
            images += n
            self.step += 1
            self.step_in_epoch += 1
            self._callback("on_step_end", loss)
            if not bar.disable:
                bar.update()
                bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{self.optimizer.param_groups[0]['lr']:.2e}")
        bar.close()
        if averaging:
            self._bn_average.stop()
        train_loss = self._reduced_epoch_loss()  # reads the loss back: the device has finished the epoch
        seconds = time.perf_counter() - start
        self._sync_buffers(self.module)
        if self.ema is not None:
            self._sync_buffers(self.ema.module)
        if not math.isfinite(train_loss):
            raise FloatingPointError(
                f"training diverged in epoch {self.epoch + 1}: the training loss is {train_loss}. "
                "Lower lr, add clip_grad_norm, or use precision='fp32'."
            )
        record = {
            "epoch": self.epoch,
            "train_loss": train_loss,
            "lr": self.last_lr,  # of the epoch's last step
            "seconds": seconds,
            "images_per_second": images / seconds if seconds > 0 else float("nan"),
        }
        if self.val_loader is not None:
            record.update(self.validate())
            record["seconds"] = time.perf_counter() - start
        return record

    @property
    def _averages_bn(self) -> bool:
        """Whether precise BN averages the training batches as they pass (rather than recomputing)."""
        return self._bn_average is not None and self._bn_min_images == 0

    def _start_bn_average(self, inputs) -> bool:
        """Start averaging BatchNorm statistics if this step begins the epoch's last batches to
        average (a resumed epoch continues the average it had begun). The first batch decides whether
        training batches are large enough to be averaged, and how many (see config.AVERAGED_BN_VALUES
        and AVERAGED_BN_IMAGES)."""
        if self._bn_min_images is None and isinstance(inputs, torch.Tensor) and inputs.ndim == 4:
            positions = deepest_positions(self.module, *inputs.shape[-2:])
            averaged = inputs.shape[0] * positions >= AVERAGED_BN_VALUES
            self._bn_min_images = 0 if averaged else math.ceil(PRECISE_BN_VALUES / positions)
            self._bn_window = min(self.config.precise_bn_batches, math.ceil(AVERAGED_BN_IMAGES / inputs.shape[0]))
        if not self._averages_bn:
            return False
        start = self.steps_per_epoch - min(self._bn_window, self.steps_per_epoch)
        if self.step_in_epoch < start:
            return False
        self._bn_average.start(restart=self.step_in_epoch == start)
        return True

    def _remaining_batches(self):
        """This epoch's batches after the ``step_in_epoch`` already done (same order as a fresh epoch)."""
        sampler = getattr(self.train_loader, "sampler", None)
        batch_size = getattr(self.train_loader, "batch_size", None)
        if hasattr(sampler, "set_start_index") and batch_size:
            sampler.set_start_index(self.step_in_epoch * batch_size)  # skipped without being loaded
            return iter(self.train_loader)
        batches = iter(self.train_loader)
        for _ in range(self.step_in_epoch):
            next(batches, None)
        return batches

    def _sync_buffers(self, module: nn.Module) -> None:
        if self.sync_buffers is not None:
            self.sync_buffers(module)

    def _reduced_epoch_loss(self) -> float:
        pair = torch.tensor([self._loss_sum.item(), float(self._epoch_count)], dtype=torch.float64)
        if self.gather is not None:
            pair = self.gather(pair.view(1, 2)).view(-1, 2).sum(0)
        return (pair[0] / pair[1]).item() if pair[1] > 0 else float("nan")

    def _train_step(self, inputs, targets) -> torch.Tensor:
        with explain_oom(inputs, "training on"):
            with autocast(self.device, self.amp_dtype):
                outputs = self.model(inputs)
                loss = self.loss_fn(outputs, targets)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if self.config.clip_grad_norm is not None:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.trainable, self.config.clip_grad_norm)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.last_lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update_parameters(self.module)
        return loss

    def recalibrate_bn(self) -> None:
        """Precise BN for :attr:`evaluated_module` by extra forward passes over ``precise_bn_batches``
        training batches (joined where they are small). Validation calls it unless the statistics
        already average the epoch's last training batches (see ``TrainConfig.precise_bn_batches``)."""
        recalibrate_bn(
            self.evaluated_module,
            self.train_loader,
            batches=min(self.config.precise_bn_batches, self.steps_per_epoch),
            device=self.device,
            amp_dtype=self.amp_dtype,
            channels_last=self.channels_last,
            frozen=self._held_names,
            min_images=self._bn_min_images or 1,
        )
        if self.config.precise_bn_batches > 0:
            self._sync_buffers(self.evaluated_module)

    def validate(self) -> dict:
        """Loss (and score, with a ``metric_fn``) of :attr:`evaluated_module` on the validation loader."""
        if not self._averages_bn:
            self.recalibrate_bn()
        outputs, targets = evaluate(
            PooledHead(self.evaluated_module) if self.head_only else self.evaluated_module,
            self.val_loader,
            device=self.device,
            amp_dtype=self.amp_dtype,
            channels_last=self.channels_last,
            gather=self.gather,
        )
        record = {"val_loss": float(self.loss_fn(outputs, targets))}
        if self.metric_fn is not None:
            record["val_score"] = float(self.metric_fn(outputs, targets))
        self._callback("on_validation_end", outputs, targets, record)
        return record

    def _update_early_stopping(self, record: dict) -> None:
        value = record.get(self.config.monitor)
        if value is None:
            self.best_epoch = self.epoch
            return
        lower_is_better = self.config.monitor == "val_loss"
        improved = self.best_value is None or (
            value < self.best_value - self.config.min_delta if lower_is_better else value > self.best_value + self.config.min_delta
        )
        if improved:
            self.best_value, self.best_epoch, self.bad_epochs = float(value), self.epoch, 0
            if self.config.early_stopping:
                self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in self.evaluated_module.state_dict().items()}
        else:
            self.bad_epochs += 1
            if self.config.early_stopping and self.bad_epochs >= self.config.patience:
                self.should_stop = True

    def _finish(self) -> None:
        if self.val_loader is None and self.history and not self._averages_bn:
            self.recalibrate_bn()
        if self.best_state is not None:
            self.evaluated_module.load_state_dict(self.best_state)
        if self.ema is not None:
            self.module.load_state_dict(self.ema.module.state_dict())

    def _seed_epoch(self) -> None:
        sampler = getattr(self.train_loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(self.epoch)
        generator = getattr(self.train_loader, "generator", None)
        if self.config.seed is not None and generator is not None:
            generator.manual_seed(self.config.seed + self.epoch)

    def _callback(self, name: str, *args) -> None:
        for cb in self.callbacks:
            getattr(cb, name)(self, *args)

    # -- state ----------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """The whole training state (tensors and plain values only: loadable with weights_only=True)."""
        return {
            "model": self.module.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "step_in_epoch": self.step_in_epoch,
            "epoch_loss": self._loss_sum.item(),
            "epoch_count": self._epoch_count,
            "history": copy.deepcopy(self.history),
            "early_stopping": {
                "best_value": self.best_value,
                "best_epoch": self.best_epoch,
                "bad_epochs": self.bad_epochs,
                "best_state": self.best_state,
                "should_stop": self.should_stop,
            },
            "rng": _get_rng_state(self.device),
            "config": self.config.to_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict`; the next :meth:`fit` continues where it was taken."""
        self.module.load_state_dict(state["model"])
        if self.ema is not None:
            if state.get("ema") is None:
                raise ValueError("this trainer keeps an EMA but the state has none")
            self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step, self.step_in_epoch = int(state["epoch"]), int(state["step"]), int(state["step_in_epoch"])
        self._loss_sum = torch.tensor(float(state["epoch_loss"]), device=self.device)
        self._epoch_count = int(state["epoch_count"])
        self.history = list(state["history"])
        es = state["early_stopping"]
        self.best_value, self.best_epoch, self.bad_epochs = es["best_value"], es["best_epoch"], int(es["bad_epochs"])
        self.best_state, self.should_stop = es["best_state"], bool(es["should_stop"])
        self._pending_rng = state.get("rng")


def _get_rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _format_record(record: dict, config: TrainConfig) -> str:
    parts = [config.epoch_label(record["epoch"])]
    for key in ("train_loss", "val_loss", "val_score"):
        if key in record:
            parts.append(f"{key} {record[key]:.4f}")
    parts.append(f"lr {record['lr']:.2e}")
    parts.append(f"{record['seconds']:.1f}s")
    return "  ".join(parts)
