"""Fine-tuning benchmark: effsk's training loop against a plain torchvision loop, and transfer accuracy.

1. Throughput: ``EfficientNetClassifier.fit`` (effsk.training) and a hand-written torchvision loop
   train the same architecture on the same images with the same settings (AdamW, per-step cosine,
   label smoothing, autocast dtype, channels_last on CUDA, batch size, DataLoader settings, the same
   torchvision.transforms.v2 pipeline). Training images per second are timed per epoch, training steps
   only (effsk's validation and BatchNorm recalibration excluded), median over the epochs after the
   first; total fit wall time is reported too. ``--repeats N`` alternates the loops N times and keeps
   the best run of each (use it on a shared machine).
2. Accuracy: scikit-learn's digits (1797 8x8 images, 10 classes) upscaled to RGB, stratified 70/30
   split, fine-tuned with and without ImageNet weights (skipped with the reason when the weights are
   not available offline).

Run from the repository root with effsk installed (``pip install -e .``), on a quiet machine for
numbers you report::

    python benchmarks/finetune.py                                  # b0, 64 px, 5 epochs
    python benchmarks/finetune.py --resolution 224 --batch-size 128 --epochs 8 --workers 8   # GPU
    python benchmarks/finetune.py --quick                          # CPU smoke test, ~a minute
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time

import numpy as np
import torch
import torchvision
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import InterpolationMode, v2

from effsk.estimators import EfficientNetClassifier
from effsk.nn import efficientnet
from effsk.utils.runtime import autocast, resolve_device, resolve_precision
from effsk.scaling import resolve
from effsk.weights import variant_preprocessing


def digits():
    """Digits as (N, 8, 8) uint8 grayscale images (effsk converts them to RGB) and labels."""
    data = load_digits()
    images = np.round(data.images * (255 / 16)).astype(np.uint8)
    return images, data.target


class _PlainImages(Dataset):
    """What a plain torchvision pipeline does with in-memory images: tensor, transform, label."""

    def __init__(self, images, labels, transform):
        self.images = torch.from_numpy(images).unsqueeze(1).expand(-1, 3, -1, -1)  # gray -> RGB
        self.labels = torch.as_tensor(labels)
        self.transform = transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.transform(self.images[i]), self.labels[i]


def _preprocessing(args):
    return variant_preprocessing(args.phi).with_resolution(args.resolution)


def plain_torchvision(X, y, args) -> dict:
    """The reference: a textbook torchvision training loop."""
    device = resolve_device(args.device)
    dtype = resolve_precision(args.precision, device)
    pre = _preprocessing(args)
    transform = v2.Compose(
        [
            v2.Resize(pre.resize_size, interpolation=InterpolationMode(pre.interpolation), antialias=True),
            v2.CenterCrop(pre.crop_size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(pre.mean, pre.std),
        ]
    )
    torch.manual_seed(0)
    name = resolve(args.phi).name
    if name is not None and name.startswith("b"):
        model = getattr(torchvision.models, f"efficientnet_{name}")(num_classes=10)
    else:
        model = efficientnet(args.phi, num_classes=10)
    channels_last = device.type == "cuda"
    model = model.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
    batch = min(args.batch_size, len(y))
    loader = DataLoader(
        _PlainImages(X, y, transform),
        batch_size=batch,
        shuffle=True,
        num_workers=args.workers,
        pin_memory=device.type == "cuda",
        drop_last=len(y) % batch == 1,
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
    start_fit = time.perf_counter()
    for _ in range(args.epochs):
        model.train()
        start, images = time.perf_counter(), 0
        running = torch.zeros((), device=device)
        for inputs, targets in loader:
            memory_format = torch.channels_last if channels_last else torch.preserve_format
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
    return {"images_per_second": _steady(rates), "fit_seconds": time.perf_counter() - start_fit}


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


def _steady(rates):
    """Median images/s over the epochs after the first (which pays for warm-up)."""
    return statistics.median(rates[1:] if len(rates) > 1 else rates)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phi", default="b0")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=5, help="epochs of the throughput runs")
    parser.add_argument("--repeats", type=int, default=1, help="throughput runs per loop, alternating; the best counts")
    parser.add_argument("--accuracy-epochs", type=int, default=15, help="max epochs of the accuracy runs (early stopping)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--limit", type=int, default=None, help="use only this many digits (stratified)")
    parser.add_argument("--weights", nargs="*", default=["none", "imagenet"], help="accuracy runs: none and/or imagenet (none given: skip)")
    parser.add_argument("--quick", action="store_true", help="b0, 32 px, 400 digits, 2 epochs: a smoke test")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--verbose", type=int, default=0)
    args = parser.parse_args(argv)
    if args.quick:
        args.resolution, args.epochs, args.accuracy_epochs, args.limit, args.batch_size = 32, 2, 3, 400, 32

    X, y = digits()
    if args.limit:
        X, _, y, _ = train_test_split(X, y, train_size=args.limit, stratify=y, random_state=0)
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.3, stratify=y, random_state=0)
    device = resolve_device(args.device)
    dtype = resolve_precision(args.precision, device)
    setting = (
        f"phi={args.phi} {args.resolution}px batch={args.batch_size} {len(y_train)} train images, device={device}"
        f"{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}, "
        f"precision={dtype or 'fp32'}, channels_last={device.type == 'cuda'}, workers={args.workers}"
    )
    print(setting, file=sys.stderr)

    plain_runs, effsk_runs = [], []
    for _ in range(args.repeats):  # alternate the two loops; the best run of each resists noisy neighbours
        plain_runs.append(plain_torchvision(X_train, y_train, args))
        clf, seconds = effsk_fit(X_train, y_train, args)
        effsk_runs.append({"images_per_second": _steady([r["images_per_second"] for r in clf.history_]), "fit_seconds": seconds})
    plain = max(plain_runs, key=lambda r: r["images_per_second"])
    best = max(effsk_runs, key=lambda r: r["images_per_second"])
    ours, effsk_seconds = best["images_per_second"], best["fit_seconds"]
    results = {
        "setting": setting,
        "throughput": {
            "effsk_images_per_second": ours,
            "torchvision_images_per_second": plain["images_per_second"],
            "ratio": ours / plain["images_per_second"],
            "effsk_fit_seconds": effsk_seconds,
            "torchvision_fit_seconds": plain["fit_seconds"],
            "epochs": args.epochs,
            "repeats": args.repeats,
        },
        "accuracy": {},
    }
    for w in args.weights:
        weights = None if w == "none" else w
        try:
            acc_clf, seconds = effsk_fit(X_train, y_train, args, weights=weights, epochs=args.accuracy_epochs, early_stopping=True)
        except (NotImplementedError, OSError, RuntimeError, ValueError) as exc:
            results["accuracy"][w] = {"error": f"{type(exc).__name__}: {exc}"}
            continue
        results["accuracy"][w] = {
            "accuracy": acc_clf.score(X_test, y_test),
            "epochs": len(acc_clf.history_),
            "best_epoch": acc_clf.best_epoch_,
            "fit_seconds": seconds,
        }

    command = "python benchmarks/finetune.py " + " ".join(argv if argv is not None else sys.argv[1:])
    t = results["throughput"]
    print(f"\n`{command.strip()}`  ({setting})\n")
    print("| loop | train img/s | ratio | fit s |")
    print("|---|---|---|---|")
    print(f"| torchvision (plain) | {t['torchvision_images_per_second']:.1f} | 1.00 | {t['torchvision_fit_seconds']:.1f} |")
    print(f"| effsk Trainer | {t['effsk_images_per_second']:.1f} | {t['ratio']:.2f} | {t['effsk_fit_seconds']:.1f} |")
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
