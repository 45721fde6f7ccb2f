"""The held-out split every trainer of the package makes: fine-tuning (early stopping), pretraining
(``val_fraction``) and the coefficient search (``validation_fraction``)."""

from __future__ import annotations

import numpy as np
from sklearn.model_selection import train_test_split

__all__ = ["holdout_split"]

# BatchNorm cannot train on a batch of one image.
_MIN_TRAIN = 2


def holdout_split(
    n: int,
    fraction: float,
    *,
    seed: int,
    stratify=None,
    param: str = "validation_fraction",
    purpose: str = "",
    remedy: str = "",
) -> tuple[np.ndarray, np.ndarray]:
    """Sorted positions ``(train, held_out)`` of ``n`` images, ``fraction`` of them held out.

    scikit-learn's :func:`~sklearn.model_selection.train_test_split`, stratified by the labels
    ``stratify`` when given, with ``random_state=seed % 2**32``. When the split cannot be made, or
    leaves fewer than 2 training images, the ``ValueError`` names the caller's setting (``param``),
    the number of images, what the split is for (``purpose``, e.g. ``" for early stopping"``),
    scikit-learn's reason, and what to do (``remedy``).

    >>> train, held_out = holdout_split(10, 0.2, seed=0, stratify=[0, 1] * 5)
    >>> len(train), len(held_out), sorted([*train, *held_out]) == list(range(10))
    (8, 2, True)
    >>> holdout_split(3, 0.5, seed=0, stratify=[0, 1, 2], remedy="Use more images.")
    Traceback (most recent call last):
    ...
    ValueError: cannot hold out validation_fraction=0.5 of 3 images stratified by class: ... Use more images.
    """
    how = " stratified by class" if stratify is not None else ""
    try:
        train, held_out = train_test_split(
            np.arange(n), test_size=fraction, stratify=stratify, random_state=seed % (2**32)
        )
    except ValueError as exc:
        raise ValueError(f"cannot hold out {param}={fraction} of {n} images{how}{purpose}: {exc} {remedy}".rstrip()) from None
    if len(train) < _MIN_TRAIN:
        raise ValueError(
            f"holding out {param}={fraction} of {n} images{purpose} leaves {len(train)} image(s) for training; "
            f"training needs at least {_MIN_TRAIN}. {remedy}".rstrip()
        )
    return np.sort(train), np.sort(held_out)
