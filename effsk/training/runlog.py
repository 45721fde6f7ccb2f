"""Per-epoch metrics of a training run: appended to JSONL and CSV logs, drawn as a PNG."""

from __future__ import annotations

import json
import os

import pandas as pd

from ..utils.fileio import atomic_write

__all__ = ["RunLog"]


class RunLog:
    """Append one record per epoch to ``<dir>/metrics.jsonl`` and ``<dir>/metrics.csv``.

    Appends are line-sized writes; on resume, :meth:`truncate_after` drops records of epochs that
    were logged after the checkpoint being resumed from, so the log and the checkpoint agree.
    """

    def __init__(self, directory):
        self.directory = os.fspath(directory)
        self.jsonl = os.path.join(self.directory, "metrics.jsonl")
        self.csv = os.path.join(self.directory, "metrics.csv")
        self.png = os.path.join(self.directory, "training_curves.png")

    def records(self) -> list[dict]:
        if not os.path.exists(self.jsonl):
            return []
        with open(self.jsonl) as fh:
            return [json.loads(line) for line in fh if line.strip()]

    def append(self, record: dict) -> None:
        os.makedirs(self.directory, exist_ok=True)
        with open(self.jsonl, "a") as fh:
            fh.write(json.dumps(record, default=float) + "\n")
        self._rewrite_csv(self.records())

    def truncate_after(self, epoch: int) -> None:
        """Keep only records with ``record["epoch"] <= epoch``."""
        kept = [r for r in self.records() if r.get("epoch", 0) <= epoch]
        if not os.path.exists(self.jsonl):
            return
        with atomic_write(self.jsonl, "w") as fh:
            fh.writelines(json.dumps(r, default=float) + "\n" for r in kept)
        self._rewrite_csv(kept)

    def _rewrite_csv(self, records: list[dict]) -> None:
        with atomic_write(self.csv, "w") as fh:
            pd.DataFrame(records).to_csv(fh, index=False)

    def plot(self) -> str | None:
        """Draw loss, accuracy and learning rate against epoch; return the PNG path."""
        records = self.records()
        if not records:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        df = pd.DataFrame(records)
        panels = [
            ("loss", [c for c in ("train_loss", "val_loss") if c in df]),
            ("accuracy", [c for c in ("train_top1", "val_top1", "val_top5") if c in df]),
            ("learning rate", [c for c in ("lr",) if c in df]),
        ]
        panels = [(title, cols) for title, cols in panels if cols]
        fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.5), squeeze=False)
        for ax, (title, cols) in zip(axes[0], panels):
            for col in cols:
                ax.plot(df["epoch"], df[col], marker="o", label=col)
            ax.set_title(title)
            ax.set_xlabel("epoch")
            ax.legend()
            ax.grid(alpha=0.3)
        fig.tight_layout()
        with atomic_write(self.png) as fh:
            fig.savefig(fh, format="png", dpi=100)
        plt.close(fig)
        return self.png
