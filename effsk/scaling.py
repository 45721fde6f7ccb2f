"""Compound scaling: the published EfficientNet table and one resolver for any phi and any arch.

Every model in effsk gets its width, depth and resolution from :func:`resolve`, and every use of the
paper's rule (Eq. 3) goes through :func:`compound`. The published B0..B7 / Lite0..Lite4 coefficients
are rounded choices (Tan & Le 2019, TF reference builder), not exact powers of (alpha, beta, gamma),
so ``scaling="official"`` keeps them verbatim for integer phi, interpolates geometrically between
published neighbours for fractional phi and extends from B7 with the compound rule beyond 7.
``scaling="compound"`` applies the rule exactly for every phi.

The compound-scaled baselines of paper Table 3 (``arch="resnet50"``, ``"mobilenet_v2"``,
``"mobilenet_v1"``) have no published scaled variants: for them phi always follows the compound rule
from the arch's own bases and base resolution (:data:`ARCH_DEFAULTS`), and phi = 0 is the standard
architecture.

Finding alpha, beta, gamma on your own data (the paper's step 1) trains networks, so it lives in the
training layer: ``effsk.search_coefficients`` (:mod:`effsk.training.search`). This module imports no torch.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, replace
from typing import NamedTuple

__all__ = [
    "ALPHA",
    "BETA",
    "GAMMA",
    "ARCH_DEFAULTS",
    "ArchDefaults",
    "Compound",
    "compound",
    "PUBLISHED",
    "Scaling",
    "StageSpec",
    "BASE_STAGES",
    "make_divisible",
    "round_channels",
    "round_repeats",
    "resolve",
    "accepted_phi",
]

ALPHA, BETA, GAMMA = 1.2, 1.1, 1.15
BASE_RESOLUTION = 224
SCALING_MODES = ("official", "compound")


class Compound(NamedTuple):
    """Multipliers of the compound rule: layers, channels and input resolution."""

    depth: float
    width: float
    resolution: float


def compound(phi: float, alpha: float = ALPHA, beta: float = BETA, gamma: float = GAMMA) -> Compound:
    """The paper's Eq. 3: depth ``alpha**phi``, width ``beta**phi``, resolution ``gamma**phi``.

    The one place the rule is written; :func:`resolve` applies it to every arch (bases are validated
    there). FLOPs grow about ``(alpha * beta**2 * gamma**2) ** phi``.

    >>> [round(m, 4) for m in compound(1)]
    [1.2, 1.1, 1.15]
    >>> round(compound(2, 1.4**0.5, 1.2**0.5, 1.3**0.5).resolution, 6)
    1.3
    """
    return Compound(alpha**phi, beta**phi, gamma**phi)


@dataclass(frozen=True)
class ArchDefaults:
    """Per-arch compound bases, base (phi = 0) resolution and classifier dropout."""

    alpha: float
    beta: float
    gamma: float
    resolution: int
    dropout: float


#: Compound bases per arch. EfficientNet: the paper's grid-search result. MobileNetV1: the square
#: roots of paper Table 3's compound point (d=1.4, w=1.2, r=1.3, ~4x the baseline's FLOPs), so phi=2
#: is exactly that model and FLOPs grow ~1.85^phi. ResNet-50 and MobileNetV2: the paper gives no
#: coefficients (Table 3 only reports ~4x-FLOPs compound models), so they take EfficientNet's
#: (FLOPs ~1.92^phi); phi=2 then gives ResNet-50 16.3B (Table 3: 16.7B) and MobileNetV2 1.49B (1.3B;
#: ceil rounding of its 1-block stages overshoots).
#: Dropout: torchvision's heads (ResNet none, MobileNetV2 0.2); MobileNetV1 TF-slim's keep 0.999.
#: EfficientNet's dropout comes from the published table instead (see :func:`resolve`).
ARCH_DEFAULTS: dict[str, ArchDefaults] = {
    "efficientnet": ArchDefaults(ALPHA, BETA, GAMMA, BASE_RESOLUTION, 0.2),
    "resnet50": ArchDefaults(ALPHA, BETA, GAMMA, BASE_RESOLUTION, 0.0),
    "mobilenet_v2": ArchDefaults(ALPHA, BETA, GAMMA, BASE_RESOLUTION, 0.2),
    "mobilenet_v1": ArchDefaults(1.4**0.5, 1.2**0.5, 1.3**0.5, BASE_RESOLUTION, 0.001),
}
# torchvision's (PyTorch default) BatchNorm settings, used by the torchvision-equal baselines.
_TORCH_BN_EPS, _TORCH_BN_MOMENTUM = 1e-5, 0.1


@dataclass(frozen=True)
class StageSpec:
    """One row of the B0 baseline (paper Table 1, stages 2-8): an MBConv stage."""

    expand_ratio: int
    kernel: int
    stride: int
    in_channels: int
    out_channels: int
    repeats: int


#: B0 baseline, paper Table 1. Stem (32 channels) and head (1280) are described by the builder.
BASE_STAGES: tuple[StageSpec, ...] = (
    StageSpec(1, 3, 1, 32, 16, 1),
    StageSpec(6, 3, 2, 16, 24, 2),
    StageSpec(6, 5, 2, 24, 40, 2),
    StageSpec(6, 3, 2, 40, 80, 3),
    StageSpec(6, 5, 1, 80, 112, 3),
    StageSpec(6, 5, 2, 112, 192, 4),
    StageSpec(6, 3, 1, 192, 320, 1),
)
BASE_STEM = 32


@dataclass(frozen=True)
class _Published:
    width: float
    depth: float
    resolution: int
    dropout: float


#: Published coefficients (TF reference builder; identical in torchvision for b0..b7).
PUBLISHED: dict[str, _Published] = {
    "b0": _Published(1.0, 1.0, 224, 0.2),
    "b1": _Published(1.0, 1.1, 240, 0.2),
    "b2": _Published(1.1, 1.2, 260, 0.3),
    "b3": _Published(1.2, 1.4, 300, 0.3),
    "b4": _Published(1.4, 1.8, 380, 0.4),
    "b5": _Published(1.6, 2.2, 456, 0.4),
    "b6": _Published(1.8, 2.6, 528, 0.5),
    "b7": _Published(2.0, 3.1, 600, 0.5),
    "lite0": _Published(1.0, 1.0, 224, 0.2),
    "lite1": _Published(1.0, 1.1, 240, 0.2),
    "lite2": _Published(1.1, 1.2, 260, 0.3),
    "lite3": _Published(1.2, 1.4, 280, 0.3),
    "lite4": _Published(1.4, 1.8, 300, 0.3),
}
_TORCHVISION_EPS = {**{f"b{k}": 1e-5 for k in range(5)}, **{f"b{k}": 1e-3 for k in range(5, 8)}}
_TORCHVISION_MOMENTUM = {**{f"b{k}": 0.1 for k in range(5)}, **{f"b{k}": 0.01 for k in range(5, 8)}}
# TF reference: BN decay 0.99 (= PyTorch momentum 0.01), epsilon 1e-3.
_TF_EPS, _TF_MOMENTUM = 1e-3, 0.01


@dataclass(frozen=True)
class Scaling:
    """A resolved configuration: everything a builder needs (EfficientNet or a scaled baseline).

    Attributes
    ----------
    name : str or None
        Published variant name (``"b3"``, ``"lite0"``) or ``None`` for an unpublished phi.
    phi : float
        Compound coefficient (for Lite variants, the phi of the B model sharing its coefficients).
    mode : {"official", "compound"}
        How phi was resolved.
    width, depth : float
        Channel and layer multipliers.
    resolution : int
        Training / evaluation input resolution.
    dropout : float
        Classifier dropout.
    lite : bool
        EfficientNet-Lite: no squeeze-excite, ReLU6, fixed stem/head, first/last repeats unscaled.
    bn_eps, bn_momentum : float
        BatchNorm settings (torchvision's for published b0..b7 and the baselines, TF's otherwise).
    arch : str
        Which network this configures: ``"efficientnet"`` or a key of :data:`ARCH_DEFAULTS`.
    """

    name: str | None
    phi: float
    mode: str
    width: float
    depth: float
    resolution: int
    dropout: float
    lite: bool = False
    bn_eps: float = _TF_EPS
    bn_momentum: float = _TF_MOMENTUM
    arch: str = "efficientnet"

    @property
    def label(self) -> str:
        """Short human name: the published name, else ``phi=<phi>`` (prefixed by a baseline's arch)."""
        if self.name is not None:
            return self.name
        return f"phi={self.phi:g}" if self.arch == "efficientnet" else f"{self.arch} phi={self.phi:g}"

    def _require_efficientnet(self, what: str) -> None:
        if self.arch != "efficientnet":
            raise ValueError(f"Scaling.{what} describes EfficientNet; this config is for arch={self.arch!r}.")

    @property
    def stem_channels(self) -> int:
        self._require_efficientnet("stem_channels")
        return BASE_STEM if self.lite else round_channels(BASE_STEM, self.width)

    @property
    def stages(self) -> tuple[StageSpec, ...]:
        """The seven MBConv stages with channels and repeats scaled."""
        self._require_efficientnet("stages")
        last = len(BASE_STAGES) - 1
        out = []
        for i, s in enumerate(BASE_STAGES):
            fixed_repeats = self.lite and i in (0, last)
            out.append(
                replace(
                    s,
                    in_channels=self.stem_channels if i == 0 else round_channels(s.in_channels, self.width),
                    out_channels=round_channels(s.out_channels, self.width),
                    repeats=s.repeats if fixed_repeats else round_repeats(s.repeats, self.depth),
                )
            )
        return tuple(out)

    @property
    def head_channels(self) -> int:
        # torchvision and the TF builder: 4 x the last stage's output (= round(1280 * width) for B0..B7).
        self._require_efficientnet("head_channels")
        return 1280 if self.lite else 4 * self.stages[-1].out_channels

    def as_dict(self) -> dict:
        """Plain-dict form for checkpoints and metadata."""
        return {
            "name": self.name,
            "phi": self.phi,
            "mode": self.mode,
            "width": self.width,
            "depth": self.depth,
            "resolution": self.resolution,
            "dropout": self.dropout,
            "lite": self.lite,
            "bn_eps": self.bn_eps,
            "bn_momentum": self.bn_momentum,
            "arch": self.arch,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Scaling":
        fields = cls.__dataclass_fields__
        return cls(**{k: v for k, v in d.items() if k in fields})


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round ``value`` to a multiple of ``divisor``, never going more than 10% below it."""
    min_value = divisor if min_value is None else min_value
    new = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if new < 0.9 * value:
        new += divisor
    return int(new)


def round_channels(channels: int, width: float) -> int:
    """Scaled channel count: ``make_divisible(channels * width, 8)``."""
    return make_divisible(channels * width, 8)


def round_repeats(repeats: int, depth: float) -> int:
    """Scaled layer count: ``ceil(depth * repeats)``."""
    return int(math.ceil(depth * repeats))


def accepted_phi() -> str:
    names = ", ".join(repr(n) for n in PUBLISHED)
    return f"a published name ({names}), a number >= 0, or a Scaling"


def _check_phi_number(phi) -> float:
    if isinstance(phi, bool) or not isinstance(phi, numbers.Real):
        raise ValueError(f"phi={phi!r} is not valid; phi must be {accepted_phi()}.")
    value = float(phi)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"phi={phi!r} is not valid; phi must be {accepted_phi()}.")
    return value


def _published(name: str, mode: str) -> Scaling:
    p = PUBLISHED[name]
    lite = name.startswith("lite")
    phi = float(name[len("lite") :] if lite else name[1:])
    return Scaling(
        name=name,
        phi=phi,
        mode=mode,
        width=p.width,
        depth=p.depth,
        resolution=p.resolution,
        dropout=p.dropout,
        lite=lite,
        bn_eps=_TORCHVISION_EPS.get(name, _TF_EPS),
        bn_momentum=_TORCHVISION_MOMENTUM.get(name, _TF_MOMENTUM),
    )


def _geometric(a: float, b: float, t: float) -> float:
    return a ** (1 - t) * b**t


def resolve(
    phi,
    scaling: str = "official",
    alpha: float | None = None,
    beta: float | None = None,
    gamma: float | None = None,
    *,
    arch: str | None = None,
) -> Scaling:
    """Resolve a compound coefficient to a :class:`Scaling`.

    Parameters
    ----------
    phi : str, float or Scaling
        A published name (``"b0"``..``"b7"``, ``"lite0"``..``"lite4"``, case-insensitive; EfficientNet
        only) or a number >= 0. A :class:`Scaling` passes through unchanged.
    scaling : {"official", "compound"}
        ``"official"``: integer k is exactly the published Bk; fractional phi interpolates width, depth
        and resolution geometrically (dropout linearly) between the published neighbours; phi > 7
        extends from B7 by the compound rule. ``"compound"``: d = alpha^phi, w = beta^phi,
        r = 224 * gamma^phi for every phi (published names still give the published variant).
        Baselines have no published table: both modes follow the compound rule.
    alpha, beta, gamma : float, optional
        Depth, width and resolution bases of the compound rule; default: the arch's
        (:data:`ARCH_DEFAULTS`; EfficientNet: the paper's 1.2, 1.1, 1.15).
    arch : str, optional
        ``"efficientnet"`` (default) or a compound-scaled baseline: ``"resnet50"``,
        ``"mobilenet_v2"``, ``"mobilenet_v1"``. With a :class:`Scaling`, must match its arch.

    Returns
    -------
    Scaling

    Examples
    --------
    >>> resolve("b3").resolution
    300
    >>> s = resolve(0.5)
    >>> round(s.width, 4), round(s.depth, 4), s.resolution
    (1.0, 1.0488, 232)
    >>> resolve(1, scaling="compound").resolution
    258
    >>> s = resolve(2, arch="mobilenet_v1")
    >>> round(s.depth, 4), round(s.width, 4), s.resolution
    (1.4, 1.2, 291)
    """
    if isinstance(phi, Scaling):
        if arch is not None and arch != phi.arch:
            raise ValueError(f"arch={arch!r} does not match the given Scaling, which is for arch={phi.arch!r}.")
        return phi
    arch = "efficientnet" if arch is None else arch
    if arch not in ARCH_DEFAULTS:
        raise ValueError(f"arch={arch!r} is not valid; use one of {tuple(ARCH_DEFAULTS)}.")
    if scaling not in SCALING_MODES:
        raise ValueError(f"scaling={scaling!r} is not valid; use one of {SCALING_MODES}.")
    defaults = ARCH_DEFAULTS[arch]
    alpha = defaults.alpha if alpha is None else alpha
    beta = defaults.beta if beta is None else beta
    gamma = defaults.gamma if gamma is None else gamma
    for name, base in (("alpha", alpha), ("beta", beta), ("gamma", gamma)):
        if isinstance(base, bool) or not isinstance(base, numbers.Real) or not base >= 1:
            raise ValueError(f"{name}={base!r} is not valid; the compound bases must be numbers >= 1.")
    if arch != "efficientnet":
        return _resolve_baseline(arch, phi, alpha, beta, gamma)
    if isinstance(phi, str):
        key = phi.strip().lower()
        if key not in PUBLISHED:
            raise ValueError(f"phi={phi!r} is not a published variant; phi must be {accepted_phi()}.")
        return _published(key, scaling)

    value = _check_phi_number(phi)
    if scaling == "compound":
        m = compound(value, alpha, beta, gamma)
        return _unpublished(value, "compound", m.width, m.depth, BASE_RESOLUTION * m.resolution,
                            _official_dropout(value))
    if value.is_integer() and value <= 7:
        return _published(f"b{int(value)}", "official")
    if value < 7:
        lo, hi = int(math.floor(value)), int(math.floor(value)) + 1
        t = value - lo
        a, b = PUBLISHED[f"b{lo}"], PUBLISHED[f"b{hi}"]
        return _unpublished(value, "official", _geometric(a.width, b.width, t), _geometric(a.depth, b.depth, t),
                            _geometric(a.resolution, b.resolution, t), _official_dropout(value))
    b7 = PUBLISHED["b7"]
    m = compound(value - 7, alpha, beta, gamma)
    return _unpublished(value, "official", b7.width * m.width, b7.depth * m.depth, b7.resolution * m.resolution,
                        b7.dropout)


def _unpublished(phi: float, mode: str, width: float, depth: float, resolution: float, dropout: float,
                 **settings) -> Scaling:
    """A Scaling that no published table names (resolution rounded to whole pixels)."""
    return Scaling(name=None, phi=phi, mode=mode, width=width, depth=depth, resolution=int(round(resolution)),
                   dropout=dropout, **settings)


def _resolve_baseline(arch: str, phi, alpha: float, beta: float, gamma: float) -> Scaling:
    if isinstance(phi, str):
        raise ValueError(
            f"phi={phi!r} is not valid for arch={arch!r}: published names are EfficientNet variants; "
            "use a number >= 0 (0 is the standard architecture)."
        )
    if isinstance(phi, bool) or not isinstance(phi, numbers.Real) or not (math.isfinite(phi) and phi >= 0):
        raise ValueError(f"phi={phi!r} is not valid for arch={arch!r}; phi must be a number >= 0.")
    value = float(phi)
    m = compound(value, alpha, beta, gamma)
    defaults = ARCH_DEFAULTS[arch]
    return _unpublished(value, "compound", m.width, m.depth, defaults.resolution * m.resolution, defaults.dropout,
                        bn_eps=_TORCH_BN_EPS, bn_momentum=_TORCH_BN_MOMENTUM, arch=arch)


def _official_dropout(phi: float) -> float:
    """Published dropout, linearly interpolated for fractional phi, 0.5 beyond B7."""
    if phi >= 7:
        return PUBLISHED["b7"].dropout
    lo = int(math.floor(phi))
    t = phi - lo
    return (1 - t) * PUBLISHED[f"b{lo}"].dropout + t * PUBLISHED[f"b{lo + 1}"].dropout
