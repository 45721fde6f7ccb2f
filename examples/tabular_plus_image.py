"""Tabular data plus images: one DataFrame, one ColumnTransformer, one classifier.

Shows the common real-world layout: a pandas DataFrame with a column of image file paths next to
numeric columns. A ``ColumnTransformer`` sends the path column through ``EfficientNetFeaturizer``
(which reads the files itself) and the numeric columns through ``StandardScaler``; a logistic
regression sees both. The script prints the test accuracy of image-only, tabular-only and combined
models, so you can see what each source contributes.

The data: scikit-learn's digits written as 64x64 greyscale PNG files to a temporary folder (effsk
converts greyscale to RGB), plus three numeric columns. ``ink`` is measured from each image (the
share of the 8x8 grid that is inked); ``sensor_x`` and ``sensor_y`` are *synthetic* readings that
carry part of the label's signal: the digit as an angle on a circle, with Gaussian noise
(``--noise``), standing in for metadata that a real table would hold. The featurizer uses
EfficientNet-Lite0 with its real ImageNet weights (offline) at 64 px, and caches features per image
(``memory=``), so the combined model reuses the image-only model's features.

Run from the repository root::

    python examples/tabular_plus_image.py                 # 1000 digits, about 10 s on 2 CPU cores
    python examples/tabular_plus_image.py --noise 0.2     # more informative numeric columns
    python examples/tabular_plus_image.py --n 60 --resolution 32   # a few seconds (smoke test)
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

import numpy as np
import pandas as pd
from PIL import Image
from sklearn.compose import ColumnTransformer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from effsk import EfficientNetFeaturizer
from effsk.data import digits_rgb

NUMERIC = ["ink", "sensor_x", "sensor_y"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="use the first N digits (default: 1000)")
    parser.add_argument("--resolution", type=int, default=64, help="crop size fed to the network (default: 64)")
    parser.add_argument("--noise", type=float, default=0.35, help="std of the sensor noise (default: 0.35)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def write_table(folder: str, n: int, noise: float, seed: int) -> tuple[pd.DataFrame, np.ndarray]:
    """Digits as PNG files in ``folder`` and a DataFrame with their paths and numeric columns."""
    images, y, pixels = digits_rgb(size=64, n=n)
    paths = []
    for i, image in enumerate(images):
        path = os.path.join(folder, f"digit_{i:04d}.png")
        Image.fromarray(image[:, :, 0]).save(path)  # one channel: a greyscale PNG
        paths.append(path)
    rng = np.random.default_rng(seed)
    angle = 2 * np.pi * y / 10
    frame = pd.DataFrame({
        "image_path": paths,
        "ink": (pixels > 4).mean(axis=1),
        "sensor_x": np.cos(angle) + rng.normal(0.0, noise, len(y)),
        "sensor_y": np.sin(angle) + rng.normal(0.0, noise, len(y)),
    })
    return frame, y


def model(columns: list[str], featurizer) -> Pipeline:
    """A logistic regression on the given columns: image features, scaled numeric columns, or both."""
    transformers = []
    if "image_path" in columns:
        transformers.append(("image", make_pipeline(featurizer, StandardScaler()), "image_path"))
    numeric = [c for c in columns if c in NUMERIC]
    if numeric:
        transformers.append(("numeric", StandardScaler(), numeric))
    return Pipeline([
        ("columns", ColumnTransformer(transformers)),
        ("clf", LogisticRegression(max_iter=1000)),
    ])


def main(argv=None) -> dict:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="effsk-tabular-") as folder:
        images_dir, cache_dir = os.path.join(folder, "images"), os.path.join(folder, "features")
        os.makedirs(images_dir)
        frame, y = write_table(images_dir, args.n, args.noise, args.seed)
        print(f"DataFrame with {len(frame)} rows; images written to {images_dir}")
        print(frame.head(3).to_string(formatters={"image_path": os.path.basename}))
        train, test, y_train, y_test = train_test_split(frame, y, test_size=0.3, stratify=y, random_state=args.seed)

        featurizer = EfficientNetFeaturizer("lite0", weights="imagenet", resolution=args.resolution, memory=cache_dir)
        candidates = {
            "image only (EfficientNet features)": ["image_path"],
            "tabular only (ink, sensor_x, sensor_y)": NUMERIC,
            "image + tabular (ColumnTransformer)": ["image_path", *NUMERIC],
        }
        scores, combined = {}, None
        for name, columns in candidates.items():
            pipe = model(columns, featurizer).fit(train, y_train)
            scores[name] = pipe.score(test, y_test)
            combined = pipe

    names = combined.named_steps["columns"].get_feature_names_out()
    print()
    print(f"combined model: {combined.named_steps['columns']}")
    print(f"  {len(names)} columns into LogisticRegression: {names[0]}, {names[1]}, ..., {', '.join(names[-3:])}")
    print()
    print(f"{'model':<40} {'test accuracy':>13}")
    for name, score in scores.items():
        print(f"{name:<40} {score:>13.4f}")
    return scores


if __name__ == "__main__":
    main()
