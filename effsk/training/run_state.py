"""The directory of a pretraining run: its files, the resumable training state written while
training (every epoch and every N steps, atomically, from rank 0) and reading it back to resume."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import time

from ..weights.checkpoint import atomic_torch_save, read_weights_file
from . import distributed
from .loop import Callback, Trainer
from .model_ops import top_k_accuracy
from .runlog import RunLog

__all__ = ["CHECKPOINT_FILE", "STATE_FILE", "RUN_FILE", "RunFiles", "PretrainCallback", "read_state",
           "load_into_trainer", "sync_log", "plain"]

CHECKPOINT_FILE = "model.pt"
STATE_FILE = "train_state.pt"
RUN_FILE = "run.json"
STATE_FORMAT = "effsk.pretrain-state"
STATE_FORMAT_VERSION = 1
# Draw the curves after an epoch only if the last drawing (or the run's start) is this old: drawing takes
# about half a second, which short epochs would otherwise pay every time (the run's end always draws them).
PLOT_EVERY_SECONDS = 60.0


def plain(value):
    """JSON round trip: tuples become lists, so stored and requested settings compare equal."""
    return json.loads(json.dumps(value, default=str))


class RunFiles:
    """The paths of a run directory (see :mod:`effsk.training.pretraining`) and its metrics log."""

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


class PretrainCallback(Callback):
    """Top-k metrics, the run log, and the resumable training state (written by rank 0)."""

    def __init__(self, files: RunFiles, signature: dict, env: distributed.DistEnv, save_every_steps: int | None):
        self.files, self.signature, self.env = files, signature, env
        self.save_every_steps = save_every_steps
        self._plotted_at = time.monotonic()

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
            if time.monotonic() - self._plotted_at >= PLOT_EVERY_SECONDS:
                self.files.log.plot()
                self._plotted_at = time.monotonic()

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


def read_state(path: str, signature: dict) -> dict:
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


def load_into_trainer(trainer: Trainer, state: dict, env: distributed.DistEnv) -> None:
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


def sync_log(log: RunLog, history: list[dict]) -> None:
    """Make the log hold exactly the epochs of ``history`` (drops epochs logged after the state)."""
    log.truncate_after(len(history) - 1)
    logged = {r.get("epoch") for r in log.records()}
    for record in history:
        if record["epoch"] not in logged:
            log.append(record)
