"""Pretrain a backbone on your own labelled images, then use its checkpoint as featurizer weights.

Shows the whole path from an ImageFolder on disk to a scikit-learn pipeline:

1. scikit-learn's digits are written as PNG files into class folders (``<tmp>/train/<label>/*.png``),
   a stand-in for a labelled collection of your own;
2. ``effsk.pretrain(...)`` trains an EfficientNet-B0 on it from random initialisation for 8
   epochs at 16 px (the digits are 8x8), and writes ``model.pt``: an effsk checkpoint that carries the
   architecture, the class names and the preprocessing (so the 16 px input size travels with it);
3. ``EfficientNetFeaturizer(weights=<model.pt>)`` turns the checkpoint into a feature extractor in
   ``Pipeline([featurizer, StandardScaler, LogisticRegression])``, fitted on new images with only a
   handful of labels per class (``--labels``), and compared with the same pipeline on a randomly
   initialised B0, whose features are a fair "no pretraining" baseline. (The same path works as
   ``EfficientNetClassifier(weights=<model.pt>)`` to fine-tune the whole network.)

What to expect (8 epochs, about a minute): with one to three labels per class the pretrained
features are clearly better than random ones (about 0.73 and 0.84 test accuracy against 0.61 and
0.66); by ten labels per class the two meet, because random convolutional features of 8x8 digits
are a strong baseline. Fewer epochs (``--epochs 4``) give a weaker backbone. The mechanics are the
same for a long GPU run on a real collection (``effsk pretrain --help``: recipes, resuming,
multi-GPU).

Why ``precise_bn_batches``: the ``"modern"`` recipe is made for long runs; in a run of a few epochs
the BatchNorm running statistics lag behind the weights, and the network in eval mode (what the
featurizer uses) predicts at chance. Recomputing the statistics from a few training batches before
each validation (and so before the checkpoint is written), as the fine-tuning estimators do, fixes
that.

Run from the repository root::

    python examples/pretrain_then_featurize.py              # 8 epochs, about 60 s on 2 CPU cores
    python examples/pretrain_then_featurize.py --labels 1 3 10 50
    python examples/pretrain_then_featurize.py --n 200 --epochs 1 --labels 3   # seconds (smoke test)
"""

from __future__ import annotations

import os

# On a CPU shared with other jobs, threads that spin while they wait make torch (OpenMP) and
# scikit-learn's small matrix products (OpenBLAS) many times slower: let idle OpenMP threads sleep,
# and give OpenBLAS one thread. Both are read when the libraries load, hence before the imports.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import tempfile
import time

import numpy as np
import torch
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

import effsk
from effsk import EfficientNetFeaturizer
from effsk.data import digits_rgb


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=None, help="use the first N digits (default: all 1797)")
    parser.add_argument("--epochs", type=int, default=8, help="pretraining epochs (default: 8)")
    parser.add_argument("--resolution", type=int, default=16, help="pretraining crop size (default: 16)")
    parser.add_argument("--batch-size", type=int, default=64, help="pretraining batch size (default: 64)")
    parser.add_argument("--lr", type=float, default=4e-3, help="pretraining learning rate (default: 4e-3)")
    parser.add_argument("--labels", nargs="+", type=int, default=[1, 3, 10],
                        help="labelled images per class for the downstream fits (default: 1 3 10)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def write_image_folder(root: str, images, labels) -> None:
    """``root/<label>/<index>.png``: the layout torchvision's ImageFolder and effsk.pretrain read."""
    for index, (image, label) in enumerate(zip(images, labels)):
        folder = os.path.join(root, f"digit_{label}")
        os.makedirs(folder, exist_ok=True)
        Image.fromarray(image).save(os.path.join(folder, f"{index:05d}.png"))


def main(argv=None) -> dict:
    args = parse_args(argv)
    X, y, _ = digits_rgb(size=32, n=args.n)
    X_pool, X_new, y_pool, y_new = train_test_split(X, y, test_size=0.4, stratify=y, random_state=args.seed)

    with tempfile.TemporaryDirectory(prefix="effsk-pretrain-") as tmp:
        data = os.path.join(tmp, "train")
        write_image_folder(data, X_pool, y_pool)
        print(f"ImageFolder: {len(X_pool)} PNG files in {len(set(y_pool))} class folders under {data}")

        start = time.perf_counter()
        result = effsk.pretrain(
            data,
            output_dir=os.path.join(tmp, "run"),
            phi="b0",
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            resolution=args.resolution,
            val_fraction=0.1,
            num_workers=0,
            seed=args.seed,
            verbose=0,
            # recipe overrides for a short CPU run: no warm-up, no weight EMA, no augmentation, no
            # stochastic depth, and BatchNorm statistics recomputed before every validation
            warmup_epochs=0,
            ema_decay=None,
            augment="none",
            drop_path_rate=0.0,
            precise_bn_batches=4,
        )
        pretrain_s = time.perf_counter() - start
        print(f"pretrained b0 for {len(result.history)} epochs in {pretrain_s:.1f} s -> {result.checkpoint}")
        print(f"  {'epoch':>5} {'train_loss':>10} {'val_loss':>8} {'val_top1':>8} {'img/s':>6}")
        for record in result.history:
            print(f"  {record['epoch']:>5} {record['train_loss']:>10.4f} {record['val_loss']:>8.4f} "
                  f"{record['val_top1']:>8.4f} {record['images_per_second']:>6.0f}")

        # The design card's pipeline with the checkpoint as weights (its 16 px preprocessing comes with
        # it), and the same pipeline on a randomly initialised B0.
        backbones = {
            "pretrained": EfficientNetFeaturizer("b0", weights=result.checkpoint),
            "random init": EfficientNetFeaturizer("b0", weights=None, resolution=args.resolution),
        }
        rows = []
        for per_class in args.labels:
            train, test = train_test_split(np.arange(len(y_new)), train_size=per_class * 10, stratify=y_new,
                                           random_state=args.seed)
            row = {"labels per class": per_class, "test images": len(test)}
            for name, featurizer in backbones.items():
                pipe = Pipeline([
                    ("feat", featurizer),
                    ("scale", StandardScaler()),
                    ("clf", LogisticRegression(max_iter=1000)),
                ])
                torch.manual_seed(args.seed)  # weights=None: the same random network for every label budget
                row[name] = pipe.fit(X_new[train], y_new[train]).score(X_new[test], y_new[test])
            rows.append(row)
        feat = backbones["pretrained"]  # fitted by the pipeline above
        print(f"featurizer from the checkpoint: {feat.scaling_.label}, {feat.preprocessing_.crop_size} px, "
              f"{len(feat.get_feature_names_out())} features")

    print()
    print("new images, few labels: featurizer + StandardScaler + LogisticRegression, test accuracy")
    print(f"{'labels per class':>16} {'test images':>11} {'pretrained':>10} {'random init':>11}")
    for row in rows:
        print(f"{row['labels per class']:>16} {row['test images']:>11} {row['pretrained']:>10.4f} "
              f"{row['random init']:>11.4f}")
    return {"rows": rows, "history": result.history}


if __name__ == "__main__":
    main()
