"""``effsk demo``: the README's design-card pipeline on a real dataset, offline, in about a minute.

scikit-learn's handwritten digits (8x8 grey, 1797 images) are upscaled to RGB and fed to
``Pipeline([("feat", EfficientNetFeaturizer("lite0", resolution=128)), ("clf", LogisticRegression(max_iter=1000))])``
(the README's pipeline at 128 px instead of 64: 0.984 against 0.960 test accuracy for about 5x the
featurizing time) with the real ImageNet-trained Lite0 weights that ship with effsk's default install;
a standardised logistic regression on the raw pixels is the baseline.
"""

from __future__ import annotations

import time

import numpy as np

from ..data.samples import digits_rgb

__all__ = ["demo_pipeline", "run_demo"]


def demo_pipeline(phi="lite0", weights="imagenet", *, resolution=128, batch_size=64, verbose=1):
    """The README's design-card pipeline: featurizer, then a logistic regression (nothing in between:
    standardising the features measured no better, 0.982 against 0.984 at 128 px)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline

    from ..estimators import EfficientNetFeaturizer

    return Pipeline([
        ("feat", EfficientNetFeaturizer(phi, weights=weights, resolution=resolution, batch_size=batch_size,
                                        verbose=verbose)),
        ("clf", LogisticRegression(max_iter=1000)),
    ])


def run_demo(phi="lite0", weights="imagenet", *, n=None, resolution=128, size=64, test_size=0.25,
             batch_size=64, random_state=0, verbose=1, print_fn=print) -> dict:
    """Fit the design card's pipeline and a raw-pixel baseline; print and return the scores."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    X, y, pixels = digits_rgb(size=size, n=n)
    idx_train, idx_test = train_test_split(np.arange(len(y)), test_size=test_size, stratify=y,
                                           random_state=random_state)
    print_fn(f"effsk demo: sklearn digits, {len(idx_train)} train / {len(idx_test)} test images, "
             f"upscaled to {size}x{size} RGB")

    pipe = demo_pipeline(phi, weights, resolution=resolution, batch_size=batch_size, verbose=verbose)
    start = time.perf_counter()
    pipe.fit(X[idx_train], y[idx_train])
    fit_s = time.perf_counter() - start
    start = time.perf_counter()
    acc = float(pipe.score(X[idx_test], y[idx_test]))
    score_s = time.perf_counter() - start

    baseline = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))  # raw pixels need scaling
    start = time.perf_counter()
    baseline.fit(pixels[idx_train], y[idx_train])
    base_acc = float(baseline.score(pixels[idx_test], y[idx_test]))
    base_s = time.perf_counter() - start

    feat = pipe.named_steps["feat"]
    n_img = len(y)
    print_fn("")
    print_fn(f"pipeline: {pipe}")
    print_fn(f"  features: {len(feat.get_feature_names_out())} per image from {feat.scaling_.label} "
             f"at {feat.preprocessing_.crop_size}px, weights={weights!r}")
    print_fn("")
    print_fn(f"{'model':<52} {'test accuracy':>13} {'seconds':>9}")
    print_fn(f"{'EfficientNetFeaturizer + LogisticRegression':<52} {acc:>13.4f} {fit_s + score_s:>9.1f}")
    print_fn(f"{'raw 8x8 pixels + StandardScaler + LogisticRegression':<52} {base_acc:>13.4f} {base_s:>9.1f}")
    print_fn(f"featurized {n_img} images at {n_img / (fit_s + score_s):.1f} img/s (fit + score)")
    return {"accuracy": acc, "baseline_accuracy": base_acc, "seconds": fit_s + score_s,
            "n_train": len(idx_train), "n_test": len(idx_test)}
