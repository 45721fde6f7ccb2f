"""Params, FLOPs and measured inference throughput against phi (b0..b7 and fractional phi).

    python benchmarks/scaling_curves.py                      # phi 0, 0.5, ..., 7 on this machine
    python benchmarks/scaling_curves.py --phis 0 1 2 --batch-size 4 --repeats 3

Writes ``benchmarks/results/scaling_curves.csv`` and ``.png`` (three panels against phi, with the
paper's FLOPs ~ 2^phi rule drawn for reference). Throughput is effsk's eval forward at each
variant's own resolution, fp32, channels_last, on the chosen device; the torchvision model of the
published variants is timed alongside on the same input as a reference.
"""

from __future__ import annotations

import argparse
import os
import time

import pandas as pd
import torch

from effsk.nn import count_macs, count_params, efficientnet
from effsk.scaling import resolve


def _images_per_second(model, x, repeats: int) -> float:
    with torch.inference_mode():
        model(x)  # warm-up
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            if x.is_cuda:
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
    return x.shape[0] / best


def main(argv=None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phis", type=float, nargs="+", default=[i / 2 for i in range(15)])
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--output", default=os.path.join(os.path.dirname(__file__), "results", "scaling_curves"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    # Random weights can drive activations into subnormal floats, which CPUs process up to 100x more
    # slowly; trained weights do not, so flush them to zero to time the architecture, not the init.
    torch.set_flush_denormal(True)
    import torchvision.models as tvm

    rows = []
    for phi in args.phis:
        s = resolve(phi)
        x = torch.randn(args.batch_size, 3, s.resolution, s.resolution, device=args.device)
        x = x.contiguous(memory_format=torch.channels_last)
        model = efficientnet(phi).eval().to(args.device, memory_format=torch.channels_last)
        row = {"phi": phi, "name": s.label, "resolution": s.resolution, "params": count_params(phi),
               "gflops": count_macs(phi) / 1e9, "effsk_img_s": _images_per_second(model, x, args.repeats)}
        if s.name is not None:
            tv = getattr(tvm, f"efficientnet_{s.name}")().eval().to(args.device, memory_format=torch.channels_last)
            row["torchvision_img_s"] = _images_per_second(tv, x, args.repeats)
        rows.append(row)
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    table = pd.DataFrame(rows)
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    table.to_csv(args.output + ".csv", index=False)
    _plot(table, args.output + ".png", args)
    print(table.to_string(index=False))
    return table


def _plot(table: pd.DataFrame, path: str, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    published = table["phi"] == table["phi"].round()
    for ax, col, title in [(axes[0], "params", "parameters (M)"), (axes[1], "gflops", "GFLOPs (multiply-adds)")]:
        scale = 1e6 if col == "params" else 1.0
        ax.plot(table["phi"], table[col] / scale, "o-", label="effsk (official scaling)")
        ax.plot(table.loc[published, "phi"], table.loc[published, col] / scale, "ks", label="published B0..B7")
        ax.set_yscale("log")
        ax.set_title(title)
    base = table.loc[table["phi"] == 0, "gflops"]
    if len(base):
        axes[1].plot(table["phi"], base.iloc[0] * 2 ** table["phi"], "--", color="grey", label="B0 x 2^phi")
    axes[2].plot(table["phi"], table["effsk_img_s"], "o-", label="effsk")
    if "torchvision_img_s" in table:
        tv = table.dropna(subset=["torchvision_img_s"])
        axes[2].plot(tv["phi"], tv["torchvision_img_s"], "s--", label="torchvision")
    axes[2].set_yscale("log")
    axes[2].set_title(f"images/s ({args.device}, batch {args.batch_size}, fp32, channels_last)")
    for ax in axes:
        ax.set_xlabel("phi")
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
