"""Depth vs width vs resolution vs compound scaling at matched FLOPs: paper Fig. 3 / Table 3, small.

From one small base model, scale depth only, width only, input resolution only, and all three with the
compound rule (d = alpha^phi, w = beta^phi, r = gamma^phi) until each model costs about ``k`` times the
base's multiply-adds, for every budget ``k``. Every model trains from scratch the same way (the shared
training loop through :func:`effsk.training.search.fit_and_score`: same split, epochs, optimiser, seed) on
scikit-learn's digits (1,797 8x8 grey images, upscaled to RGB by the model's preprocessing), then the
script prints the table and plots validation accuracy against FLOPs.

    python benchmarks/scaling_study.py                        # defaults: EfficientNet, 32 px, budgets 2x 4x
    python benchmarks/scaling_study.py --epochs 4 --budgets 2 4 8 --seeds 0 1 --n-jobs 2 --threads 1

FLOPs are multiply-adds per image (the paper's convention), counted by :func:`effsk.nn.count_macs`.
benchmarks/results/scaling_study.{png,csv} come from ``--n-jobs 2 --threads 1`` with the other defaults
(about 6 minutes on 2 shared CPU cores). At this scale (4 epochs from scratch, 1,347 training images,
one seed) resolution scaling wins, width is flat, compound lands below the base and depth collapses:
the deeper, narrow models have not finished fitting the training set, so the study measures short-budget
trainability as much as capacity. Longer training and several seeds are the first things to change.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from joblib import Parallel, delayed
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from effsk.nn import build, count_macs
from effsk.scaling import ALPHA, BETA, GAMMA, Scaling, compound, resolve
from effsk.training.search import fit_and_score
from effsk.training import TrainConfig

METHODS = ("depth", "width", "resolution", "compound")
COLOURS = {"base": "black", "depth": "tab:blue", "width": "tab:orange", "resolution": "tab:green",
           "compound": "tab:red"}


def digits_rgb() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as (N, 8, 8, 3) uint8 images (values 0..16 stretched to 0..255)."""
    digits = load_digits()
    grey = np.round(digits.images * (255 / 16)).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1), digits.target.astype(np.int64)


def base_scaling(arch: str, width: float, depth: float, resolution: int) -> Scaling:
    """phi = 0 of ``arch`` (the compound rule's config), shrunk to the given multipliers."""
    return replace(resolve(0, scaling="compound", arch=arch), width=width, depth=depth, resolution=resolution)


def round_resolution(value: float, multiple: int) -> int:
    """Nearest multiple of ``multiple``. At a few dozen pixels a stride-32 network's FLOPs jump at every
    size just past a multiple of 16 or 32 (33 px costs twice 32 px: the last maps grow from 1x1 to
    2x2, mostly padding), so sizes move in steps, as channel counts do in steps of 8."""
    return max(multiple, round(value / multiple) * multiple)


def scaled(base: Scaling, method: str, amount: float, coefficients, multiple: int) -> Scaling:
    """``base`` grown along ``method``: a multiplier for one dimension, or phi for compound."""
    if method == "depth":
        return replace(base, depth=base.depth * amount)
    if method == "width":
        return replace(base, width=base.width * amount)
    if method == "resolution":
        return replace(base, resolution=round_resolution(base.resolution * amount, multiple))
    if method == "compound":
        m = compound(amount, *coefficients)
        return replace(base, depth=base.depth * m.depth, width=base.width * m.width,
                       resolution=round_resolution(base.resolution * m.resolution, multiple))
    raise ValueError(f"method={method!r}; use one of {METHODS}")


def macs_of(arch: str, scaling: Scaling, num_classes: int) -> int:
    with torch.device("meta"):
        return count_macs(build(arch, scaling, num_classes=num_classes))


def match_budget(arch, base, method, target, coefficients, multiple, num_classes):
    """The amount of ``method`` whose model's MACs are nearest ``target`` (in ratio).

    MACs only grow with each amount (channels and repeats round up in steps), so a bisection finds
    the first amount that reaches the target; the step just below it is the other candidate.
    """
    start = 0.0 if method == "compound" else 1.0
    cost = lambda amount: macs_of(arch, scaled(base, method, amount, coefficients, multiple), num_classes)
    lo, hi = start, start + 1.0
    while cost(hi) < target:
        lo, hi = hi, start + 2 * (hi - start)
        if hi - start > 64:
            raise RuntimeError(f"{method} scaling cannot reach {target:,} MACs")
    for _ in range(14):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cost(mid) < target else (lo, mid)
    below, above = cost(lo), cost(hi)
    amount = lo if abs(math.log(below / target)) < abs(math.log(above / target)) else hi
    return amount, scaled(base, method, amount, coefficients, multiple)


def _train(name, arch, scaling, data, config, batch_size, threads):
    if threads:
        torch.set_num_threads(threads)
    X_train, y_train, X_val, y_val = data
    result = fit_and_score(arch, scaling, X_train, y_train, X_val, y_val, num_classes=10, config=config,
                           batch_size=batch_size)
    return name, config.seed, result


def plot(table: pd.DataFrame, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    base = table[table["method"] == "base"].iloc[0]
    for method in METHODS:
        rows = pd.concat([table[table["method"] == "base"], table[table["method"] == method]])
        ax.errorbar(rows["macs"] / 1e6, 100 * rows["val_acc"], yerr=100 * rows["val_acc_std"].fillna(0),
                    marker="o", capsize=3, color=COLOURS[method], label=method)
    ax.plot(base["macs"] / 1e6, 100 * base["val_acc"], "ko", zorder=5)
    ax.annotate("base", (base["macs"] / 1e6, 100 * base["val_acc"]), textcoords="offset points", xytext=(4, -12))
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(FormatStrFormatter("%g"))
    ax.set_xlabel("FLOPs per image (million multiply-adds, log scale)")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="efficientnet", choices=("efficientnet", "resnet50", "mobilenet_v2", "mobilenet_v1"))
    parser.add_argument("--base-width", type=float, default=0.25, help="width multiplier of the base model")
    parser.add_argument("--base-depth", type=float, default=0.5, help="depth multiplier of the base model")
    parser.add_argument("--base-resolution", type=int, default=40, help="input size of the base model (px)")
    parser.add_argument("--resolution-multiple", type=int, default=8, help="scaled input sizes are multiples of this")
    parser.add_argument("--budgets", type=float, nargs="+", default=[2.0, 4.0], help="FLOPs targets, x base")
    parser.add_argument("--coefficients", type=float, nargs=3, default=[ALPHA, BETA, GAMMA],
                        metavar=("ALPHA", "BETA", "GAMMA"), help="compound bases (default: the paper's)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--validation-fraction", type=float, default=0.25)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="one training run per seed and model")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--n-jobs", type=int, default=1, help="models trained at once (processes)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per training process")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/scaling_study.png"),
                        help="PNG plot; the table goes next to it as .csv")
    parser.add_argument("--dry-run", action="store_true", help="print the matched models, train nothing")
    args = parser.parse_args(argv)
    if args.base_resolution % args.resolution_multiple:
        parser.error(f"--base-resolution {args.base_resolution} is not a multiple of --resolution-multiple "
                     f"{args.resolution_multiple}")
    return args


def print_models(configs: dict, arch: str, base_macs: int) -> None:
    for (method, budget), (amount, scaling) in configs.items():
        macs = macs_of(arch, scaling, 10)
        print(f"{method:>10} {budget:>4g}x  amount {amount:7.4f}  depth {scaling.depth:.3f}  width "
              f"{scaling.width:.3f}  {scaling.resolution:3d}px  {macs / 1e6:7.2f}M MACs ({macs / base_macs:.2f}x)")


def train_all(configs: dict, data, args) -> list:
    """``(key, seed, fit_and_score result)`` for every model and seed, largest models first."""
    tasks = []
    for key, (_, scaling) in configs.items():
        for seed in args.seeds:
            config = TrainConfig(max_epochs=args.epochs, lr=args.lr, schedule="cosine", warmup_epochs=min(1.0, args.epochs / 10),
                                 precise_bn_batches=32, device=args.device, seed=seed)
            tasks.append((key, scaling, config))
    tasks.sort(key=lambda t: -macs_of(args.arch, t[1], 10))  # largest first: workers finish together
    return Parallel(n_jobs=args.n_jobs, verbose=10 if args.n_jobs != 1 else 0)(
        delayed(_train)(key, args.arch, scaling, data, config, args.batch_size, args.threads)
        for key, scaling, config in tasks
    )


def summarise(configs: dict, runs: list, base_macs: int) -> pd.DataFrame:
    """One row per model: its config and cost, and its scores averaged over the seeds."""
    rows = []
    for (method, budget), (amount, scaling) in configs.items():
        results = [r for key, _, r in runs if key == (method, budget)]
        accs = np.array([r["val_score"] for r in results])
        rows.append({
            "method": method,
            "budget": budget,
            "amount": amount,
            "depth": scaling.depth,
            "width": scaling.width,
            "resolution": scaling.resolution,
            "params": results[0]["params"],
            "macs": results[0]["macs"],
            "macs_ratio": results[0]["macs"] / base_macs,
            "val_acc": accs.mean(),
            "val_acc_std": accs.std(ddof=1) if len(accs) > 1 else float("nan"),
            "val_loss": np.mean([r["val_loss"] for r in results]),
            "train_loss": np.mean([r["train_loss"] for r in results]),
            "seconds": np.mean([r["train_seconds"] for r in results]),
        })
    return pd.DataFrame(rows)


def main(argv=None) -> int:
    args = parse_args(argv)
    X, y = digits_rgb()
    train_idx, val_idx = train_test_split(np.arange(len(y)), test_size=args.validation_fraction, stratify=y,
                                          random_state=0)
    data = (X[train_idx], y[train_idx], X[val_idx], y[val_idx])
    coefficients = tuple(args.coefficients)
    base = base_scaling(args.arch, args.base_width, args.base_depth, args.base_resolution)
    base_macs = macs_of(args.arch, base, 10)

    configs = {("base", 1.0): (float("nan"), base)}
    for method in METHODS:
        for budget in args.budgets:
            configs[(method, budget)] = match_budget(args.arch, base, method, budget * base_macs, coefficients,
                                                     args.resolution_multiple, 10)
    if args.dry_run:
        print_models(configs, args.arch, base_macs)
        return 0

    print(f"{len(configs)} models x {len(args.seeds)} seed(s), {args.epochs} epochs each, on "
          f"{len(train_idx)} training / {len(val_idx)} validation digits; base {base_macs / 1e6:.2f}M MACs",
          flush=True)
    start = time.perf_counter()
    runs = train_all(configs, data, args)
    wall = time.perf_counter() - start
    table = summarise(configs, runs, base_macs)
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.float_format", "{:.4g}".format):
        print(table.to_string(index=False))
    print(f"wall time {wall:.0f}s (torch threads per process: {args.threads or torch.get_num_threads()}, "
          f"n_jobs {args.n_jobs})")

    args.output.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.output.with_suffix(".csv"), index=False)
    title = (f"digits: {args.arch} base width {args.base_width:g}, depth {args.base_depth:g}, "
             f"{args.base_resolution} px; {args.epochs} epochs, seeds {args.seeds}\n"
             f"compound alpha, beta, gamma = {', '.join(f'{c:g}' for c in coefficients)}")
    plot(table, args.output, title)
    print(f"wrote {args.output} and {args.output.with_suffix('.csv')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
