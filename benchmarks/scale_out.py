"""Scale out: one process with T threads against W Dask worker processes with 1 thread each.

The same N JPEG files (sklearn's digits upscaled to RGB, written once to a temporary directory) are
featurized by

* ``one process``: ``EfficientNetFeaturizer.transform(paths)`` with ``torch.set_num_threads(T)``;
* ``dask``: ``effsk.dask.featurize`` over a Dask Series of the paths on a
  ``LocalCluster(n_workers=W, threads_per_worker=1, processes=True)``, once with Dask's worker
  defaults and once under ``effsk.dask.WORKER_CONFIG`` (Dask's default ``MALLOC_TRIM_THRESHOLD_``
  slows torch's CPU inference; see ``effsk/jobs/dask.py``).

Each row reports the median and best img/s over ``--repeats`` passes after one warm-up pass (the
warm-up ships the featurizer to the workers and prepares each worker's model; its time is reported
separately as "first pass"). The largest difference between the Dask and the one-process features
is printed with the table. ``--malloc-check`` instead times the bare network in fresh processes under
glibc's, Dask's and effsk's malloc settings. Run ``python benchmarks/scale_out.py --help``; README.md in this folder holds a
measured table.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads sleep (shared machines)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from effsk.data import digits_rgb  # noqa: E402
from effsk.estimators import EfficientNetFeaturizer  # noqa: E402


def write_jpegs(folder: Path, n: int, size: int) -> list[str]:
    images, _, _ = digits_rgb(size=size)
    paths = []
    for i in range(n):
        paths.append(str(folder / f"{i:05d}.jpg"))
        Image.fromarray(images[i % len(images)]).save(paths[-1], quality=90)
    return paths


def timed_passes(run, repeats: int) -> tuple[float, list[float]]:
    """Seconds of the first (warm-up) pass and of each following pass."""
    start = time.perf_counter()
    run()
    first = time.perf_counter() - start
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - start)
    return first, seconds


_FORWARD = """
import time, torch
from effsk.nn import efficientnet
torch.set_num_threads(1)
model, x = efficientnet("{phi}").eval(), torch.randn({batch}, 3, {resolution}, {resolution})
with torch.inference_mode():
    model(x)
    start = time.perf_counter()
    for _ in range({repeats}):
        model(x)
print((time.perf_counter() - start) / {repeats})
"""


def malloc_check(args) -> None:
    """One-thread forward time of the network in fresh processes under each malloc setting."""
    import subprocess

    from effsk.dask import WORKER_CONFIG

    tuned = {key.rpartition(".")[2]: str(value) for key, value in WORKER_CONFIG.items()}
    code = _FORWARD.format(phi=args.phi, batch=args.batch_size, resolution=args.resolution, repeats=5)
    root = str(Path(__file__).resolve().parents[1])
    print(f"{args.phi} forward pass, batch {args.batch_size} at {args.resolution} px, 1 thread, fresh process each")
    print("\n| malloc environment | seconds per batch | x glibc defaults |\n|---|---:|---:|")
    base = None
    for name, extra in [("glibc defaults", {}), ("MALLOC_TRIM_THRESHOLD_=65536 (Dask's worker default)",
                                                   {"MALLOC_TRIM_THRESHOLD_": "65536"}),
                        ("effsk.dask.WORKER_CONFIG", tuned)]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
        env.update(extra, PYTHONPATH=root, OMP_NUM_THREADS="1")
        run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        seconds = float(run.stdout.split()[-1])
        base = base or seconds
        print(f"| {name} | {seconds:.3f} | {seconds / base:.2f} |")


def dask_passes(paths, featurizer, args, config: dict):
    """Time ``effsk.dask.featurize`` on a fresh LocalCluster started under ``config``."""
    import dask
    import dask.dataframe as dd
    import pandas as pd
    from distributed import Client, LocalCluster

    import effsk.dask

    environ = dict(os.environ)  # nannies write their workers' variables into this process's environment
    with dask.config.set(config), LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True,
                                               dashboard_address=None) as cluster, Client(cluster) as client:
        features = []

        def one_pass():
            # A new collection per pass: the same one could be answered from results still in memory.
            series = dd.from_pandas(pd.Series(paths, name=f"path{len(features)}"), npartitions=args.partitions)
            features.append(client.compute(effsk.dask.featurize(series, featurizer)).result())

        first, seconds = timed_passes(one_pass, args.repeats)
        threads = sorted(set(client.run(torch.get_num_threads).values()))
    os.environ.clear()
    os.environ.update(environ)
    return first, seconds, features[0].to_numpy(), threads


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phi", default="lite0", help="variant (default lite0: its weights ship with effsk)")
    parser.add_argument("--weights", default="imagenet", help="'imagenet' or 'none'")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--n", type=int, default=1000, help="JPEG files")
    parser.add_argument("--size", type=int, default=80, help="side of the written JPEGs")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the one process")
    parser.add_argument("--workers", type=int, default=2, help="Dask worker processes (1 thread each)")
    parser.add_argument("--partitions", type=int, default=4, help="Dask partitions (each costs Dask ~0.1 s of bookkeeping)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--malloc-check", action="store_true",
                        help="only time the network's forward pass under glibc's, Dask's and effsk's malloc settings")
    args = parser.parse_args(argv)
    if args.malloc_check:
        malloc_check(args)
        return 0

    from effsk.dask import WORKER_CONFIG

    # Dask warns about graphs over 10 MB; here that is the featurizer, in the graph once on purpose.
    warnings.filterwarnings("ignore", message="Sending large graph")
    weights = None if args.weights.lower() == "none" else args.weights
    featurizer = EfficientNetFeaturizer(args.phi, weights=weights, resolution=args.resolution,
                                        batch_size=args.batch_size).fit()
    workers = f"Dask, {args.workers} workers x 1 thread, {args.partitions} partitions"
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_jpegs(Path(tmp), args.n, args.size)
        torch.set_num_threads(args.threads)
        local = []
        rows = [(f"one process, {args.threads} threads",
                 *timed_passes(lambda: local.append(featurizer.transform(paths)), args.repeats))]
        threads = set()
        for name, config in [("Dask's worker defaults", {}), ("effsk.dask.WORKER_CONFIG", WORKER_CONFIG)]:
            first, seconds, features, used = dask_passes(paths, featurizer, args, config)
            rows.append((f"{workers}, {name}", first, seconds))
            threads.update(used)
            diff = float(np.abs(features - local[0]).max())

    print(f"{args.n} JPEGs ({args.size}x{args.size}), {featurizer.scaling_.label} at {args.resolution} px, "
          f"weights={args.weights}, batch {args.batch_size}, fp32, {args.repeats} timed passes after a warm-up")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; "
          f"torch threads per Dask worker: {sorted(threads)}; max |dask - one process| = {diff:.2e}")
    base = statistics.median(rows[0][2])
    print("\n| run | first pass s | img/s (median) | best img/s | x one process |")
    print("|---|---:|---:|---:|---:|")
    for name, first, seconds in rows:
        median = statistics.median(seconds)
        print(f"| {name} | {first:.1f} | {args.n / median:.0f} | {args.n / min(seconds):.0f} | {base / median:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
