"""Fine-tuning with freezing: EfficientNetClassifier on digits, from real ImageNet weights.

Shows ``EfficientNetClassifier`` (a scikit-learn classifier that trains the network itself) with two
freezing strategies, starting from EfficientNet-Lite0's ImageNet weights (offline):

- ``freeze="backbone"``: only the new classification head trains; the ImageNet features (and their
  BatchNorm statistics) stay fixed. Cheap: the backward pass stops at the head.
- ``freeze="auto"`` (the default): the head trains alone for ``head_epochs=1`` epoch, then the
  whole network is unfrozen and fine-tuned (fastai's ``fine_tune`` schedule), the pretrained
  layers at 0.3 times the head's learning rate after a warm-up, their BatchNorm statistics kept as
  loaded. Slower per epoch, and it adapts the features to the task.

Each fit holds out 10% of its training images for early stopping and keeps the best epoch's
weights. The script prints the test accuracy, the fit time and the per-epoch ``history_``
(phase, losses, validation accuracy, learning rate, throughput) of each strategy. Digits are small
(64x64 upscaled from 8x8), so training runs at 64 px (``--resolution``), which keeps a few epochs of
full fine-tuning within a minute on a CPU.

Run from the repository root::

    python examples/fine_tune.py                          # 900 digits, 5 epochs, about 30-45 s on 2 CPU cores
    python examples/fine_tune.py --freeze backbone auto 3 # also: stem and first 3 stages frozen
    python examples/fine_tune.py --n 80 --epochs 1 --resolution 32   # a few seconds (smoke test)
"""

from __future__ import annotations

import os

# On a CPU shared with other jobs, threads that spin while they wait make torch (OpenMP) and
# scikit-learn's small matrix products (OpenBLAS) many times slower: let idle OpenMP threads sleep,
# and give OpenBLAS one thread. Both are read when the libraries load, hence before the imports.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import time

from sklearn.model_selection import train_test_split

from effsk import EfficientNetClassifier
from effsk.data import digits_rgb


def freeze_value(text: str):
    return int(text) if text.isdigit() else text


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--freeze", nargs="+", type=freeze_value, default=["backbone", "auto"],
                        help="strategies to compare: auto, none, backbone, bn or a number of frozen stages")
    parser.add_argument("--n", type=int, default=900, help="use the first N digits (default: 900)")
    parser.add_argument("--epochs", type=int, default=5, help="max_epochs of each fit (default: 5)")
    parser.add_argument("--resolution", type=int, default=64, help="training crop size (default: 64)")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default: 1e-3)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def print_history(history) -> None:
    print(f"  {'epoch':>5} {'phase':<6} {'train_loss':>10} {'val_loss':>8} {'val_acc':>7} {'lr':>8} {'img/s':>6}")
    for record in history:
        print(f"  {record['epoch']:>5} {record['phase']:<6} {record['train_loss']:>10.4f} {record['val_loss']:>8.4f} "
              f"{record['val_score']:>7.4f} {record['lr']:>8.1e} {record['images_per_second']:>6.0f}")


def main(argv=None) -> dict:
    args = parse_args(argv)
    X, y, _ = digits_rgb(size=64, n=args.n)
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.3, stratify=y, random_state=args.seed)
    print(f"digits: {len(X_train)} train / {len(X_test)} test images; EfficientNet-Lite0 from ImageNet weights, "
          f"{args.resolution} px, up to {args.epochs} epochs")

    scores = {}
    for freeze in args.freeze:
        clf = EfficientNetClassifier(
            "lite0",
            weights="imagenet",
            freeze=freeze,
            resolution=args.resolution,
            max_epochs=args.epochs,
            lr=args.lr,
            random_state=args.seed,
        )
        start = time.perf_counter()
        clf.fit(X_train, y_train)
        fit_s = time.perf_counter() - start
        scores[freeze] = clf.score(X_test, y_test)
        print()
        print(f"freeze={freeze!r}: test accuracy {scores[freeze]:.4f}, fit {fit_s:.1f} s, "
              f"weights of epoch {clf.best_epoch_} kept (epochs 0-{len(clf.history_) - 1} ran)")
        print_history(clf.history_)

    print()
    print(f"{'freeze':<10} {'test accuracy':>13}")
    for freeze, score in scores.items():
        print(f"{freeze!r:<10} {score:>13.4f}")
    return scores


if __name__ == "__main__":
    main()
