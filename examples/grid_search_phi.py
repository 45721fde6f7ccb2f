"""GridSearchCV over phi: the compound-scaling coefficient is a hyperparameter like any other.

Shows ``GridSearchCV`` choosing the EfficientNet variant (``feat__phi``) and its input resolution
(``feat__resolution``) of a featurizer -> logistic regression pipeline by cross-validation, and a
table of mean test score, its spread over the folds, fit time, backbone parameters and
multiply-adds per image for every candidate.

Why EfficientNet-Lite0/1/2 with ImageNet weights: a grid over phi means something only when every
candidate's features are trained; the Lite weights are the ones available offline (Lite0 ships
with effsk, Lite1/Lite2 with its ``[dev]``/``[lite]`` extras; a variant whose weights are missing is
skipped with a note). B0..B7 need a one-off download, and randomly initialised networks of any phi
would only compare random features. The resolutions are kept low (64 and 128 px for 64 px
digits) so that the grid runs on a CPU in about half a minute; ``--resolutions 0`` means "the variant's
own resolution" (224/240/260, which is the full compound scaling but takes several minutes).

Features are cached per image (``EfficientNetFeaturizer(memory=...)`` in a temporary folder), so
the cross-validation folds and the final refit featurize each image once per candidate: the first
fold's fit time includes the featurization, the others read the cache.

Run from the repository root::

    python examples/grid_search_phi.py                     # 600 digits, 3 phi x 2 resolutions, 3-fold CV, ~30 s
    python examples/grid_search_phi.py --phis lite0 lite2 --resolutions 96
    python examples/grid_search_phi.py --n 60 --phis lite0 lite1 --resolutions 32 --cv 2   # smoke test
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
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, train_test_split
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from effsk import EfficientNetFeaturizer
from effsk.data import digits_rgb
from effsk.nn import count_macs, count_params
from effsk.weights import imagenet_weights_status


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phis", nargs="+", default=["lite0", "lite1", "lite2"], help="candidate variants")
    parser.add_argument("--resolutions", nargs="+", type=int, default=[64, 128],
                        help="candidate crop sizes; 0 = the variant's own (default: 64 128)")
    parser.add_argument("--n", type=int, default=600, help="use the first N digits (default: 600)")
    parser.add_argument("--cv", type=int, default=3, help="cross-validation folds (default: 3)")
    parser.add_argument("--no-cache", action="store_true", help="featurize every fold from scratch")
    return parser.parse_args(argv)


def available(phis):
    """The variants whose ImageNet weights are on this machine; a note for each missing one."""
    kept = []
    for phi in phis:
        status = imagenet_weights_status(phi)
        if status.startswith("installed") or status == "cached":
            kept.append(phi)
        else:
            print(f"skipping {phi}: its ImageNet weights are not available offline here ({status})")
    if not kept:
        raise SystemExit("no candidate has ImageNet weights here; try --phis lite0")
    return kept


def main(argv=None) -> GridSearchCV:
    args = parse_args(argv)
    phis = available(args.phis)
    resolutions = [None if r == 0 else r for r in args.resolutions]
    X, y, _ = digits_rgb(size=64, n=args.n)
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.25, stratify=y, random_state=0)
    print(f"digits: {len(X_train)} images for {args.cv}-fold cross-validation, {len(X_test)} held out")

    with tempfile.TemporaryDirectory(prefix="effsk-features-") as cache:
        pipe = Pipeline([
            ("feat", EfficientNetFeaturizer("lite0", weights="imagenet", memory=None if args.no_cache else cache)),
            ("scale", StandardScaler()),
            ("clf", LogisticRegression(max_iter=1000)),
        ])
        param_grid = {"feat__phi": phis, "feat__resolution": resolutions}
        print(f"param_grid: {param_grid}")
        search = GridSearchCV(pipe, param_grid, cv=args.cv)
        start = time.perf_counter()
        search.fit(X_train, y_train)
        search_s = time.perf_counter() - start
        test_accuracy = search.score(X_test, y_test)

    results = search.cv_results_
    print()
    header = (f"{'phi':<6} {'res':>4} {'params':>7} {'MMACs':>7} {'mean test acc':>13} {'std':>6} "
              f"{'mean fit s':>10} {'rank':>4}")
    print(header)
    print("-" * len(header))
    for i in np.argsort(results["rank_test_score"], kind="stable"):
        phi = results["param_feat__phi"][i]
        resolution = results["param_feat__resolution"][i]
        shown = resolution if resolution is not None else "own"
        params_m = count_params(phi, num_classes=0) / 1e6
        macs_m = count_macs(phi, resolution, num_classes=0) / 1e6
        print(f"{phi:<6} {shown!s:>4} {params_m:>6.2f}M {macs_m:>7.0f} {results['mean_test_score'][i]:>13.4f} "
              f"{results['std_test_score'][i]:>6.4f} {results['mean_fit_time'][i]:>10.2f} "
              f"{results['rank_test_score'][i]:>4}")
    print()
    print(f"grid search: {len(results['params'])} candidates x {args.cv} folds in {search_s:.1f} s")
    print(f"best: {search.best_params_} (mean cv accuracy {search.best_score_:.4f})")
    print(f"held-out test accuracy of the refitted best pipeline: {test_accuracy:.4f}")
    return search


if __name__ == "__main__":
    main()
