"""The design card's pipeline: EfficientNet features -> logistic regression, on real pretrained weights.

Shows the one-line idea of effsk: an EfficientNet is a scikit-learn transformer, so

    Pipeline([("feat", EfficientNetFeaturizer("lite0")), ("clf", LogisticRegression())])

is an image classifier that fits, scores, cross-validates and pickles like any other pipeline.
The data are scikit-learn's handwritten digits (1797 8x8 grey images), upscaled to 64x64 RGB
(``effsk.data.digits_rgb``); the features come from EfficientNet-Lite0 with its real ImageNet
weights (installed with effsk, so this runs offline). A logistic regression on the raw 8x8 pixels is
printed as a baseline. Everything ImageNet-trained sees 128x128 crops here (``--resolution``):
near full accuracy at a fraction of the 224x224 cost on a CPU.

Run from the repository root::

    python examples/pipeline.py                          # all 1797 digits, about 15-30 s on 2 CPU cores
    python examples/pipeline.py --resolution 224         # Lite0's own resolution (slower)
    python examples/pipeline.py --n 100 --resolution 32  # a few seconds (smoke test)
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

from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score
from sklearn.model_selection import train_test_split
from sklearn.pipeline import Pipeline

from effsk import EfficientNetFeaturizer
from effsk.data import digits_rgb


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phi", default="lite0", help="EfficientNet variant (default: lite0)")
    parser.add_argument("--weights", default="imagenet", help="'imagenet', 'none' or a checkpoint path")
    parser.add_argument("--n", type=int, default=None, help="use the first N digits (default: all 1797)")
    parser.add_argument("--resolution", type=int, default=128, help="crop size fed to the network (default: 128)")
    parser.add_argument("--test-size", type=float, default=0.25, help="held-out share (default: 0.25)")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    weights = None if args.weights.lower() == "none" else args.weights
    X, y, pixels = digits_rgb(size=64, n=args.n)
    X_train, X_test, p_train, p_test, y_train, y_test = train_test_split(
        X, pixels, y, test_size=args.test_size, stratify=y, random_state=0
    )
    print(f"digits: {len(X_train)} train / {len(X_test)} test images, {X.shape[1]}x{X.shape[2]} RGB uint8")

    pipe = Pipeline([
        ("feat", EfficientNetFeaturizer(args.phi, weights=weights, resolution=args.resolution)),
        ("clf", LogisticRegression(max_iter=1000)),
    ])
    start = time.perf_counter()
    pipe.fit(X_train, y_train)
    fit_s = time.perf_counter() - start
    start = time.perf_counter()
    accuracy = accuracy_score(y_test, pipe.predict(X_test))
    predict_s = time.perf_counter() - start

    feat = pipe.named_steps["feat"]
    print(f"pipeline: {pipe}")
    print(f"features: {len(feat.get_feature_names_out())} per image from {feat.scaling_.label} "
          f"at {feat.preprocessing_.crop_size}px, weights={weights!r}")
    print(f"fit {fit_s:.1f} s, predict {predict_s:.1f} s "
          f"({len(X) / (fit_s + predict_s):.0f} images/s through the whole pipeline)")

    baseline = LogisticRegression(max_iter=1000).fit(p_train, y_train)
    baseline_accuracy = accuracy_score(y_test, baseline.predict(p_test))
    print()
    print(f"test accuracy, EfficientNet features + LogisticRegression: {accuracy:.4f}")
    print(f"test accuracy, raw 8x8 pixels + LogisticRegression:        {baseline_accuracy:.4f}")
    return {"accuracy": accuracy, "baseline_accuracy": baseline_accuracy}


if __name__ == "__main__":
    main()
