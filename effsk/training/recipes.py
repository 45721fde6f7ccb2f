"""Pretraining recipes: the paper's ImageNet recipe and a modern one, each a :class:`TrainConfig`
plus what lies outside the loop (learning rate per 256 images, augmentation, dropout, BatchNorm)."""

from __future__ import annotations

import dataclasses
from numbers import Integral, Real

from sklearn.utils._param_validation import Interval, StrOptions, validate_parameter_constraints, validate_params

from ..data.transforms import AUGMENT_PRESETS
from .config import TrainConfig

__all__ = ["Recipe", "RECIPES", "get_recipe"]

# TrainConfig fields a run sets, not a recipe: the learning rate comes from ``lr_per_256`` and the
# global batch, ``max_epochs`` is the recipe's ``epochs``, the others belong to the machine or the display.
_RUN_FIELDS = frozenset({"max_epochs", "lr", "device", "precision", "channels_last", "seed", "steps_per_epoch",
                         "verbose", "epoch_offset", "total_epochs", "phase"})
#: The TrainConfig settings a recipe holds, readable and overridable as the recipe's own.
TRAIN_SETTINGS = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name not in _RUN_FIELDS)

_CONSTRAINTS = {
    "train": [TrainConfig],
    "lr_per_256": [Interval(Real, 0, None, closed="neither")],
    "augment": [StrOptions(set(AUGMENT_PRESETS))],
    "drop_path_rate": [Interval(Real, 0, 1, closed="left")],
    "drop_rate": [Interval(Real, 0, 1, closed="left"), None],
    "bn_momentum": [Interval(Real, 0, 1, closed="both"), None],
    "bn_eps": [Interval(Real, 0, None, closed="neither"), None],
    "epochs": [Interval(Integral, 1, None, closed="left")],
}


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Every setting of a pretraining recipe (see :data:`RECIPES`).

    Settings are read and overridden by their flat names (:meth:`names`): ``recipe.optimizer``,
    ``recipe.replace(epochs=90, ema_decay=None)``; the TrainConfig ones (:data:`TRAIN_SETTINGS`) live
    in ``train``.

    Parameters
    ----------
    train : TrainConfig
        Optimiser, schedule, EMA, label smoothing, freezing, early stopping...; its ``max_epochs``
        is the recipe's ``epochs``. Its ``lr`` and machine settings are replaced per run
        (:meth:`train_config`).
    lr_per_256 : float
        The learning rate is ``lr_per_256 * batch_size / 256`` (linear scaling with the global
        batch, as the TF reference scales it).
    augment : str
        A preset of :func:`effsk.data.transforms.train_transform`.
    drop_path_rate : float
        Stochastic depth of the last block.
    drop_rate : float or None
        Classifier dropout; ``None`` takes the variant's (0.2 for B0 up to 0.5 for B7).
    bn_momentum, bn_eps : float or None
        BatchNorm settings (PyTorch convention: momentum 0.01 is TF's decay 0.99); ``None`` keeps the
        variant's. ``bn_eps`` applies only to models trained from scratch: loaded weights keep the
        eps they were trained with, which is part of the function they compute.

    >>> paper = RECIPES["paper"]
    >>> paper.optimizer, paper.lr_for(4096), paper.decay_rate, paper.decay_epochs
    ('rmsprop', 0.256, 0.97, 2.4)
    >>> paper.replace(epochs=90).epochs
    90
    """

    train: TrainConfig
    lr_per_256: float
    augment: str
    drop_path_rate: float
    drop_rate: float | None = None
    bn_momentum: float | None = None
    bn_eps: float | None = None

    def __post_init__(self):
        validate_parameter_constraints(_CONSTRAINTS, self.settings(), caller_name="Recipe")

    def __getattr__(self, name):
        # only called for names the dataclass lacks: the TrainConfig settings, read through
        if name in TRAIN_SETTINGS:
            return getattr(self.train, name)
        raise AttributeError(f"'Recipe' object has no attribute {name!r}")

    @property
    def epochs(self) -> int:
        return self.train.max_epochs

    @classmethod
    def names(cls) -> list[str]:
        """Every setting, by the name :meth:`replace`, ``pretrain(**overrides)`` and ``--set`` take."""
        own = [f.name for f in dataclasses.fields(cls) if f.name != "train"]
        return ["epochs", *TRAIN_SETTINGS, *own]

    def settings(self) -> dict:
        """``{name: value}`` for every setting of :meth:`names`."""
        return {name: getattr(self, name) for name in self.names()}

    def replace(self, **changes) -> "Recipe":
        """A copy with ``changes``; unknown names are an error that lists the valid ones."""
        unknown = sorted(set(changes) - set(self.names()))
        if unknown:
            raise TypeError(f"unknown recipe setting(s) {unknown}; valid settings: {', '.join(self.names())}")
        train = {k: v for k, v in changes.items() if k in TRAIN_SETTINGS}
        if "epochs" in changes:
            train["max_epochs"] = changes["epochs"]
        own = {k: v for k, v in changes.items() if k not in train and k != "epochs"}
        return dataclasses.replace(self, train=dataclasses.replace(self.train, **train), **own)

    def lr_for(self, batch_size: int) -> float:
        """The learning rate for a global batch of ``batch_size`` images."""
        return self.lr_per_256 * batch_size / 256

    def train_config(self, *, lr: float, **runtime) -> TrainConfig:
        """The :class:`TrainConfig` of this recipe at learning rate ``lr`` (and ``runtime`` fields:
        device, precision, seed, verbose...)."""
        return dataclasses.replace(self.train, lr=lr, **runtime)


RECIPES: dict[str, Recipe] = {
    # Tan & Le 2019 and the TF reference (REFERENCE.md): RMSProp (decay 0.9, momentum 0.9, eps 1e-3),
    # lr 0.016 per 256 images x0.97 every 2.4 epochs after 5 warm-up epochs, weight decay 1e-5, label
    # smoothing 0.1, weight EMA 0.9999 (with TF's ramp), AutoAugment, stochastic depth 0.2, the
    # variant's dropout, BatchNorm decay 0.99 / eps 1e-3, ~350 epochs.
    "paper": Recipe(
        TrainConfig(
            max_epochs=350,
            optimizer="rmsprop",
            weight_decay=1e-5,
            momentum=0.9,
            rmsprop_decay=0.9,
            eps=1e-3,
            schedule="step",
            warmup_epochs=5,
            decay_epochs=2.4,
            decay_rate=0.97,
            label_smoothing=0.1,
            ema_decay=0.9999,
            ema_warmup=True,
        ),
        lr_per_256=0.016,
        augment="autoaugment",
        drop_path_rate=0.2,
        bn_momentum=0.01,
        bn_eps=1e-3,
    ),
    # The DeiT / ConvNeXt ImageNet recipe family: AdamW at 5e-4 per 512 images (4e-3 at 4096), weight
    # decay 0.05, 5 warm-up epochs then cosine to 1e-6, label smoothing 0.1, RandAugment (2 ops,
    # magnitude 9), weight EMA 0.9999, 300 epochs; EfficientNet's stochastic depth 0.2.
    "modern": Recipe(
        TrainConfig(
            max_epochs=300,
            optimizer="adamw",
            weight_decay=0.05,
            schedule="cosine",
            warmup_epochs=5,
            min_lr=1e-6,
            label_smoothing=0.1,
            ema_decay=0.9999,
            ema_warmup=True,
        ),
        lr_per_256=2.5e-4,
        augment="randaugment",
        drop_path_rate=0.2,
    ),
}


@validate_params({"recipe": [StrOptions(set(RECIPES)), Recipe]}, prefer_skip_nested_validation=True)
def get_recipe(recipe: str | Recipe = "modern", **overrides) -> Recipe:
    """A recipe by name (or as given) with ``overrides`` applied (see :meth:`Recipe.names`).

    >>> get_recipe("paper", epochs=10, augment="light").epochs
    10
    """
    recipe = RECIPES[recipe] if isinstance(recipe, str) else recipe
    return recipe.replace(**overrides)
