"""Fine-tuning benchmark: ``EfficientNetClassifier.fit`` and ``effsk.pretrain``, end to end, against
plain torchvision loops; and transfer accuracy.

1. Throughput. Every row trains the same architecture from scratch (torchvision's efficientnet_bN, or
   effsk's network for other phi) on the same images, ``--epochs`` epochs, batch ``--batch-size``, AdamW
   with a per-step cosine, label smoothing 0.1, no augmentation, in the same process, the rows
   alternated ``--repeats`` times (the best run of each counts: other jobs only ever slow a run down).

   - ``plain NCHW`` / ``plain channels_last``: a textbook loop over in-memory uint8 images, the weights'
     eval transform (torchvision.transforms.v2) applied image by image in a Dataset.
   - ``effsk fit``: ``EfficientNetClassifier(weights=None, augment="none").fit`` with its defaults:
     10% of the images held out and validated every epoch for early stopping (so 90% train).
   - ``effsk fit, early_stopping=False``: every image trains and nothing is validated, the plain
     loops' work exactly.
   - ``plain files ...`` and ``effsk pretrain``: the same images as PNG files in class folders;
     the plain loops decode them with ``torchvision.io.decode_image``; ``pretrain`` runs the
     ``"modern"`` recipe with ``augment="none"``, ``ema_decay=None`` and no validation, and writes
     its checkpoints, metrics and plot.

   Rates per row: ``steps img/s``, the training steps alone (median over the epochs after the
   first), and ``end-to-end img/s``: images given x epochs / wall time of the whole call (building the
   model, loading and transforming images, training, validation, BatchNorm statistics, checkpoints),
   which is what a user waits for. ``per CPU s`` divides by the process's CPU time instead, which
   other jobs on a shared machine barely change (all rows run in this process with the same threads;
   ``--workers 0``): its ratios are the ones to trust there. Ratios compare end-to-end rates.
2. Accuracy: scikit-learn's digits (1797 8x8 images, 10 classes) upscaled to RGB, stratified 70/30
   split, fine-tuned with and without ImageNet weights (skipped with the reason when the weights are
   not available offline).

Run from the repository root with effsk installed (``pip install -e .``); on a shared machine let
OpenMP sleep and read the ratios::

    OMP_WAIT_POLICY=PASSIVE python benchmarks/finetune.py --threads 2 --repeats 2 --weights   # the issue's setting
    python benchmarks/finetune.py --resolution 224 --batch-size 128 --epochs 3 --workers 8 --device cuda
    python benchmarks/finetune.py --quick                          # CPU smoke test, ~a minute
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
import torchvision
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import InterpolationMode, v2

from effsk import pretrain
from effsk.estimators import EfficientNetClassifier
from effsk.nn import efficientnet
from effsk.scaling import resolve
from effsk.utils.runtime import autocast, prefers_channels_last, resolve_device, resolve_precision
from effsk.weights import variant_preprocessing

CLASSES = 10


def digits():
    """Digits as (N, 8, 8) uint8 grayscale images (effsk converts them to RGB) and labels."""
    data = load_digits()
    images = np.round(data.images * (255 / 16)).astype(np.uint8)
    return images, data.target


def random_images(n: int, size: int, seed: int = 0):
    """``n`` RGB uint8 ``(size, size, 3)`` images and labels 0..9: content does not change the speed."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8), np.arange(n) % CLASSES


def write_image_folder(X, y, root: str) -> list[tuple[str, int]]:
    """The images as PNG files in one folder per class (what ``pretrain`` reads)."""
    files = []
    for i, (pixels, label) in enumerate(zip(X, y)):
        folder = os.path.join(root, f"class_{label}")
        os.makedirs(folder, exist_ok=True)
        files.append((os.path.join(folder, f"{i}.png"), int(label)))
        Image.fromarray(pixels).save(files[-1][0])
    return files


class _ArrayImages(Dataset):
    """What a plain torchvision pipeline does with in-memory images: tensor, transform, label."""

    def __init__(self, images, labels, transform):
        self.images = torch.from_numpy(images).permute(0, 3, 1, 2)
        self.labels = torch.as_tensor(labels)
        self.transform = transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.transform(self.images[i]), self.labels[i]


class _FileImages(Dataset):
    """What a plain torchvision pipeline does with image files: decode, transform, label."""

    def __init__(self, files, transform):
        self.files, self.transform = files, transform

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        path, label = self.files[i]
        return self.transform(decode_image(path, mode=ImageReadMode.RGB)), label


def _preprocessing(args):
    return variant_preprocessing(args.phi).with_resolution(args.resolution)


def _plain_transform(args):
    pre = _preprocessing(args)
    return v2.Compose(
        [
            v2.Resize(pre.resize_size, interpolation=InterpolationMode(pre.interpolation), antialias=True),
            v2.CenterCrop(pre.crop_size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(pre.mean, pre.std),
        ]
    )


def _plain_model(args):
    name = resolve(args.phi).name
    if name is not None and name.startswith("b"):
        return getattr(torchvision.models, f"efficientnet_{name}")(num_classes=CLASSES)
    return efficientnet(args.phi, num_classes=CLASSES)


def plain_loop(dataset_fn, n_images: int, args, channels_last: bool) -> dict:
    """The reference: a textbook torchvision training loop, timed from building the model on."""
    device = resolve_device(args.device)
    dtype = resolve_precision(args.precision, device)
    start_fit, start_cpu = time.perf_counter(), time.process_time()
    torch.manual_seed(0)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = _plain_model(args).to(device, memory_format=memory_format)
    batch = min(args.batch_size, n_images)
    loader = DataLoader(
        dataset_fn(),
        batch_size=batch,
        shuffle=True,
        num_workers=args.workers,
        pin_memory=device.type == "cuda",
        drop_last=n_images % batch == 1,
        generator=torch.Generator().manual_seed(0),
    )
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}], lr=args.lr)
    total = args.epochs * len(loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    rates = []
    for _ in range(args.epochs):
        model.train()
        start, images = time.perf_counter(), 0
        running = torch.zeros((), device=device)
        for inputs, targets in loader:
            inputs = inputs.to(device, non_blocking=True, memory_format=memory_format)
            targets = targets.to(device, non_blocking=True)
            with autocast(device, dtype):
                loss = criterion(model(inputs), targets)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            running += loss.detach() * inputs.shape[0]
            images += inputs.shape[0]
        running.item()  # wait for the device, as effsk's epoch end does
        rates.append(images / (time.perf_counter() - start))
    return _rates(rates, n_images * args.epochs, time.perf_counter() - start_fit, time.process_time() - start_cpu)


def effsk_fit(X, y, args, weights=None, epochs=None, early_stopping=False):
    clf = EfficientNetClassifier(
        args.phi,
        weights=weights,
        resolution=args.resolution,
        max_epochs=epochs or args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        augment="none",
        early_stopping=early_stopping,
        device=args.device,
        precision=args.precision,
        num_workers=args.workers,
        random_state=0,
        verbose=args.verbose,
    )
    start = time.perf_counter()
    clf.fit(X, y)
    return clf, time.perf_counter() - start


def effsk_fit_rates(X, y, args, early_stopping: bool) -> dict:
    start_cpu = time.process_time()
    clf, seconds = effsk_fit(X, y, args, early_stopping=early_stopping)
    cpu_seconds = time.process_time() - start_cpu
    return _rates([r["images_per_second"] for r in clf.history_], len(y) * args.epochs, seconds, cpu_seconds)


def effsk_pretrain_rates(root: str, n_images: int, args, run: list) -> dict:
    run[0] += 1
    start, start_cpu = time.perf_counter(), time.process_time()
    result = pretrain(
        root, output_dir=os.path.join(root, os.pardir, f"run{run[0]}"), phi=args.phi, recipe="modern",
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, resolution=args.resolution, augment="none",
        ema_decay=None, device=args.device, precision=args.precision, num_workers=args.workers, seed=0, verbose=0,
    )
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
    return _rates([r["images_per_second"] for r in result.history], n_images * args.epochs, seconds, cpu_seconds)


def _rates(step_rates, images: int, seconds: float, cpu_seconds: float) -> dict:
    return {"steps_images_per_second": _steady(step_rates), "images_per_second": images / seconds, "seconds": seconds,
            "images_per_cpu_second": images / cpu_seconds, "cpu_seconds": cpu_seconds}


def _steady(rates):
    """Median images/s over the epochs after the first (which pays for warm-up)."""
    return statistics.median(rates[1:] if len(rates) > 1 else rates)


def throughput(args) -> list[dict]:
    """Every row, alternated ``args.repeats`` times; the best run of each (wall and CPU time apart)."""
    X, y = random_images(args.images, args.image_size)
    plain_transform = _plain_transform(args)
    with tempfile.TemporaryDirectory() as tmp:
        root = os.path.join(tmp, "images")
        files = write_image_folder(X, y, root) if args.pretrain else []
        n, pretrain_runs = len(y), [0]
        rows = {
            "plain NCHW": lambda: plain_loop(lambda: _ArrayImages(X, y, plain_transform), n, args, False),
            "plain channels_last": lambda: plain_loop(lambda: _ArrayImages(X, y, plain_transform), n, args, True),
            "effsk fit": lambda: effsk_fit_rates(X, y, args, early_stopping=True),
            "effsk fit, early_stopping=False": lambda: effsk_fit_rates(X, y, args, early_stopping=False),
        }
        if args.pretrain:
            rows.update({
                "plain files NCHW": lambda: plain_loop(lambda: _FileImages(files, plain_transform), n, args, False),
                "plain files channels_last": lambda: plain_loop(lambda: _FileImages(files, plain_transform), n, args, True),
                "effsk pretrain": lambda: effsk_pretrain_rates(root, n, args, pretrain_runs),
            })
        best: dict[str, dict] = {}
        for repeat in range(args.repeats):
            for name, run in rows.items():
                result = run()
                print(f"  repeat {repeat}: {name:<32} {result['images_per_second']:6.1f} img/s end to end, "
                      f"{result['images_per_cpu_second']:6.1f} per CPU s", file=sys.stderr, flush=True)
                kept = best.setdefault(name, result)
                for key in ("steps_images_per_second", "images_per_second", "images_per_cpu_second"):
                    kept[key] = max(kept[key], result[key])
                kept["seconds"], kept["cpu_seconds"] = min(kept["seconds"], result["seconds"]), min(kept["cpu_seconds"], result["cpu_seconds"])
    return [{"row": name, **result} for name, result in best.items()]


def _ratio(rows: dict, name: str, reference: str, key: str) -> float:
    return rows[name][key] / rows[reference][key] if reference in rows else float("nan")


def throughput_table(results: list[dict]) -> str:
    rows = {r["row"]: r for r in results}
    lines = [
        "| row | steps img/s | end-to-end img/s | x plain NCHW | x plain channels_last | end-to-end img/CPU s | "
        "x plain NCHW | x plain channels_last | wall s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows.items():
        files = name.startswith("plain files") or name == "effsk pretrain"
        nchw, cl = ("plain files NCHW", "plain files channels_last") if files else ("plain NCHW", "plain channels_last")
        wall, cpu = "images_per_second", "images_per_cpu_second"
        lines.append(
            f"| {name} | {r['steps_images_per_second']:.1f} | {r[wall]:.1f} | {_ratio(rows, name, nchw, wall):.2f} | "
            f"{_ratio(rows, name, cl, wall):.2f} | {r[cpu]:.1f} | {_ratio(rows, name, nchw, cpu):.2f} | "
            f"{_ratio(rows, name, cl, cpu):.2f} | {r['seconds']:.1f} |"
        )
    return "\n".join(lines)


def accuracy(args) -> dict:
    X, y = digits()
    if args.limit:
        X, _, y, _ = train_test_split(X, y, train_size=args.limit, stratify=y, random_state=0)
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.3, stratify=y, random_state=0)
    results = {}
    for w in args.weights:
        weights = None if w == "none" else w
        try:
            clf, seconds = effsk_fit(X_train, y_train, args, weights=weights, epochs=args.accuracy_epochs, early_stopping=True)
        except (NotImplementedError, OSError, RuntimeError, ValueError) as exc:
            results[w] = {"error": f"{type(exc).__name__}: {exc}"}
            continue
        results[w] = {"accuracy": clf.score(X_test, y_test), "epochs": len(clf.history_), "best_epoch": clf.best_epoch_,
                      "fit_seconds": seconds}
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phi", default="b0")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--images", type=int, default=384, help="images of the throughput runs")
    parser.add_argument("--image-size", type=int, default=64, help="their side in pixels")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2, help="epochs of the throughput runs")
    parser.add_argument("--repeats", type=int, default=1, help="throughput runs per row, alternating; the best counts")
    parser.add_argument("--no-pretrain", dest="pretrain", action="store_false", help="skip the pretrain rows")
    parser.add_argument("--accuracy-epochs", type=int, default=15, help="max epochs of the accuracy runs (early stopping)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--limit", type=int, default=None, help="accuracy runs: use only this many digits (stratified)")
    parser.add_argument("--weights", nargs="*", default=["none", "imagenet"], help="accuracy runs: none and/or imagenet (none given: skip)")
    parser.add_argument("--quick", action="store_true", help="b0, 32 px, 128 images, 400 digits, 2 epochs: a smoke test")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--verbose", type=int, default=0)
    args = parser.parse_args(argv)
    if args.quick:
        args.resolution, args.image_size, args.images, args.accuracy_epochs, args.limit = 32, 32, 128, 3, 400
    if args.threads:
        torch.set_num_threads(args.threads)

    device = resolve_device(args.device)
    setting = (
        f"phi={args.phi} {args.resolution}px batch={args.batch_size}, {args.images} random {args.image_size}px images x "
        f"{args.epochs} epochs, device={device}"
        f"{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}, "
        f"precision={resolve_precision(args.precision, device) or 'fp32'}, "
        f"effsk channels_last={prefers_channels_last(device)} (CPU kernels {torch.backends.cpu.get_cpu_capability()}), "
        f"threads={torch.get_num_threads()}, workers={args.workers}"
    )
    print(setting, file=sys.stderr)
    load_before = os.getloadavg()[0]
    results = {"setting": setting, "throughput": throughput(args), "accuracy": accuracy(args)}
    results["load_average"] = [load_before, os.getloadavg()[0]]

    command = "python benchmarks/finetune.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"\n`{command.strip()}`  ({setting}; load average {load_before:.1f} -> {os.getloadavg()[0]:.1f})\n")
    print(throughput_table(results["throughput"]))
    print("\n| weights | digits test accuracy | epochs (best) | fit s |")
    print("|---|---|---|---|")
    for w, r in results["accuracy"].items():
        if "error" in r:
            print(f"| {w} | unavailable: {r['error'][:90]} | | |")
        else:
            print(f"| {w} | {r['accuracy']:.4f} | {r['epochs']} ({r['best_epoch']}) | {r['fit_seconds']:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
