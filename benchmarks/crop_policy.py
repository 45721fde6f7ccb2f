"""Crop policies on offline data: EfficientNetFeaturizer features + logistic regression, per policy.

Each dataset is featurized once per ``crop`` policy (Lite0 ImageNet weights, which ship offline, at
resolution 64 unless told otherwise); ``StandardScaler + LogisticRegression`` on the features is
scored by stratified 5-fold cross-validation: each image is predicted once, by the model of the fold
that holds it out. Cells give the accuracy and, in brackets, the paired difference from ``"auto"``
(percentage points) with its standard error over the images.

Datasets, all offline:

* ``digits28``: sklearn's digits, 28 px, no page margin (``digits_rgb(size=28, margin=0)``): the
  digit fills the frame, like MNIST-style data.
* ``digits28_margin2``: the same with the 2-pixel page margin ``effsk demo`` uses.
* ``digits28_tight``: each digit cut to its ink's bounding box first, so the digit touches all four
  sides (the 8x8 digits leave their first and last columns nearly blank).
* ``lfw25``: scikit-image's ``lfw_subset`` (25 px grey, faces against non-faces), when installed.
* ``photos_large`` / ``photos_small``: random crops (shorter side 100-200 px, aspect 3:4-4:3) of
  sklearn's two sample photos, labelled by photo and by the cell of a 3x3 grid that holds the crop's
  centre (18 classes); ``_small`` shrinks each crop to a 40 px shorter side.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/crop_policy.py --threads 1
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from effsk import EfficientNetFeaturizer
from effsk.data.samples import digits_rgb

POLICIES = ("center", "squash", "letterbox", 0.95, 1.0, "auto")


def digits(margin: int):
    X, y, _ = digits_rgb(size=28, margin=margin)
    return list(X), y


def tight_digits():
    """sklearn's digits cut to the bounding box of their ink, then resized to 28x28 like digits_rgb."""
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = []
    for ink in digits.images:
        rows, cols = np.flatnonzero(ink.any(1)), np.flatnonzero(ink.any(0))
        box = torch.from_numpy(255.0 - ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1] * (255.0 / 16.0))
        big = F.interpolate(box.float()[None, None], size=(28, 28), mode="bicubic", align_corners=False)
        images.append(big[0, 0].clamp(0, 255).round().to(torch.uint8)[:, :, None].expand(-1, -1, 3).numpy())
    return images, digits.target


def lfw():
    from skimage.data import lfw_subset

    grey = (lfw_subset() * 255).round().astype(np.uint8)
    return [np.repeat(g[:, :, None], 3, axis=2) for g in grey], np.repeat([1, 0], len(grey) // 2)


def photo_crops(short_side: int | None, per_class: int = 30, seed: int = 0):
    """Random crops of the sample photos, labelled (photo, 3x3 grid cell of the crop's centre)."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(seed)
    images, labels = [], []
    for p, photo in enumerate(load_sample_images().images):
        height, width = photo.shape[:2]
        for cell in range(9):
            row, col = divmod(cell, 3)
            for _ in range(per_class):
                side = rng.uniform(100, 200)
                aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
                # the shorter side is ``side``; width / height = aspect
                h, w = (int(side), int(side * aspect)) if aspect >= 1 else (int(side / aspect), int(side))
                cy = rng.uniform(row * height / 3, (row + 1) * height / 3)
                cx = rng.uniform(col * width / 3, (col + 1) * width / 3)
                top = int(np.clip(cy - h / 2, 0, height - h))
                left = int(np.clip(cx - w / 2, 0, width - w))
                crop = photo[top : top + h, left : left + w]
                if short_side is not None:
                    scale = short_side / min(h, w)
                    crop = np.asarray(Image.fromarray(crop).resize((round(w * scale), round(h * scale)), Image.BICUBIC))
                images.append(crop)
                labels.append(p * 9 + cell)
    return images, np.asarray(labels)


DATASETS = {
    "digits28": lambda: digits(0),
    "digits28_margin2": lambda: digits(2),
    "digits28_tight": tight_digits,
    "lfw25": lfw,
    "photos_large": lambda: photo_crops(None),
    "photos_small": lambda: photo_crops(40),
}


def correct(X, y, policy, args) -> np.ndarray:
    """Whether each image is classified correctly when held out (5-fold cross-validation)."""
    featurizer = EfficientNetFeaturizer(args.phi, resolution=args.resolution, crop=policy, batch_size=64)
    features = featurizer.fit().transform(X)
    classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000))
    folds = StratifiedKFold(5, shuffle=True, random_state=0)
    return cross_val_predict(classifier, features, y, cv=folds) == y


def cell(hits: np.ndarray, reference: np.ndarray) -> str:
    difference = 100 * (hits.astype(float) - reference)
    return f"{hits.mean():.3f} ({difference.mean():+.1f}±{difference.std(ddof=1) / np.sqrt(len(hits)):.1f})"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phi", default="lite0")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print("| dataset | n | " + " | ".join(map(str, POLICIES)) + " |")
    print("|---|---:|" + "---:|" * len(POLICIES))
    for name in args.datasets:
        try:
            X, y = DATASETS[name]()
        except ImportError as exc:
            print(f"| {name} | skipped: {exc} |")
            continue
        start = time.perf_counter()
        hits = {policy: correct(X, y, policy, args) for policy in POLICIES}
        row = [cell(hits[policy], hits["auto"]) for policy in POLICIES]
        print(f"| {name} | {len(y)} | " + " | ".join(row) + f" |  ({time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
