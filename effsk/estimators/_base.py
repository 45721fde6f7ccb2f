"""Shared pieces of the effsk estimators: parameter constraints and their documentation, model
building, device and precision, and the one inference path (a prepared copy of ``model_``)."""

from __future__ import annotations

import copy
import functools
import os
import re
import weakref
from collections.abc import Callable, Hashable
from dataclasses import replace
from numbers import Integral, Real

import torch
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted
from tqdm.auto import tqdm

from ..data.gpu_decode import make_device_loader, resolve_decode, resolve_num_workers
from ..data.images import make_loader
from ..data.preprocessing import CROP_POLICIES, Preprocessing
from ..nn.inference import CompiledOrEager, compile_options, optimize_for_inference
from ..nn.registry import ARCHITECTURES
from ..utils.runtime import PRECISIONS, autocast, explain_oom, resolve_device, resolve_precision
from ..scaling import SCALING_MODES, Scaling
from .. import weights as _weights

__all__ = [
    "MODEL_PARAMETER_CONSTRAINTS",
    "RUNTIME_PARAMETER_CONSTRAINTS",
    "CROP_CONSTRAINTS",
    "DEFAULT_CROP",
    "input_preprocessing",
    "PARAMETER_DOCS",
    "document_parameters",
    "build_estimator_model",
    "resolve_runtime",
    "derived_from_model",
    "prepared_model",
    "compiled_inference",
    "PreparedInferenceMixin",
]

#: Parameters that define the network: ``phi`` (a published name, a number >= 0, a Scaling, or
#: ``None`` for a checkpoint's own variant), ``arch``, ``weights``, and the compound rule.
MODEL_PARAMETER_CONSTRAINTS = {
    "phi": [str, Interval(Real, 0, None, closed="left"), Scaling, None],
    "arch": [StrOptions(set(ARCHITECTURES))],
    "weights": [None, str, os.PathLike],
    "scaling": [StrOptions(set(SCALING_MODES))],
    "alpha": [Interval(Real, 1, None, closed="left"), None],
    "beta": [Interval(Real, 1, None, closed="left"), None],
    "gamma": [Interval(Real, 1, None, closed="left"), None],
}

#: How an image becomes the network's square input: a named policy or a crop fraction in (0, 1].
CROP_CONSTRAINTS = {"crop": [StrOptions(set(CROP_POLICIES)), Interval(Real, 0, 1, closed="right")]}

#: The estimators' ``crop``, chosen by measurement (see PARAMETER_DOCS["crop"]).
DEFAULT_CROP = "auto"

#: Parameters that only say where and how the network runs.
RUNTIME_PARAMETER_CONSTRAINTS = {
    "batch_size": [Interval(Integral, 1, None, closed="left")],
    "device": [str, torch.device],
    "precision": [StrOptions(set(PRECISIONS))],
    "num_workers": [Interval(Integral, 0, None, closed="left"), StrOptions({"auto"})],
    "verbose": ["verbose"],
}

#: numpydoc entries of the parameters every estimator shares, written once; a tuple of names is a
#: group of entries (see :func:`document_parameters`).
PARAMETER_DOCS = {
    "model_parameters": ("phi", "weights", "arch", "scaling", "alpha_beta_gamma"),
    "phi": """\
phi : str, float, Scaling or None, default="b0"
    The variant: a published name (``"b0"``..``"b7"``, ``"lite0"``..``"lite4"``), a compound
    coefficient >= 0 (see :func:`effsk.scaling.resolve`) or a :class:`~effsk.scaling.Scaling`.
    ``None`` takes the variant stored in ``weights``, which must then be an effsk checkpoint.""",
    "weights": """\
weights : "imagenet", None or path, default="imagenet"
    Published ImageNet weights, random initialisation (``None``), or a file: an effsk checkpoint
    or a torchvision-format state_dict.""",
    "arch": """\
arch : {"efficientnet", "resnet50", "mobilenet_v2", "mobilenet_v1"}, default="efficientnet"
    The network phi scales; the compound-scaled baselines of paper Table 3 are built the same way.""",
    "scaling": """\
scaling : {"official", "compound"}, default="official"
    How a numeric phi becomes width, depth and resolution (see :func:`effsk.scaling.resolve`).""",
    "alpha_beta_gamma": """\
alpha, beta, gamma : float, default=None
    Depth, width and resolution bases of the compound rule, which ``scaling="compound"`` uses for
    every numeric phi, ``"official"`` beyond phi = 7, and the baselines in both modes. ``None``
    uses the arch's own (:data:`effsk.scaling.ARCH_DEFAULTS`; EfficientNet: 1.2, 1.1, 1.15).""",
    "crop": """\
crop : {"auto", "center", "squash", "letterbox"} or float, default="auto"
    Which part of each image the network sees (see :class:`~effsk.data.preprocessing.Preprocessing`):
    ``"center"`` is the weights' published recipe (resize the shorter side, centre-crop: it cuts the
    borders); ``"squash"`` resizes the whole image to the square; ``"letterbox"`` fits it inside and
    pads with the mean colour; a float is a crop fraction (timm's ``crop_pct``). ``"auto"`` squashes
    an image the centre recipe would upscale (shorter side below the resize size) and keeps that
    recipe for larger ones. Replaces the policy stored with the weights; stored in
    ``preprocessing_`` and in checkpoints made from it.
    Why ``"auto"`` (Lite0 ImageNet features at 64 px + logistic regression, accuracy): on small images
    that fill their frame the whole image wins (issue 13's held-out 28 px set: 0.859 against 0.831
    for ``"center"``; 40 px photo crops: squash 0.883, 1.0 0.878, 0.95 0.863, center 0.848,
    letterbox 0.844); on large photo crops ``"center"`` is within noise of squash (0.863 against
    0.876, standard error 1.5), so photos keep their published recipe. On upscaled 8x8 digits the
    centre crop's zoom helped (0.945 against 0.935) but squash at the same object scale (resolution
    73) scores the same (0.942): raise ``resolution`` for that. See ``benchmarks/crop_policy.py``.""",
    "batch_size": """\
batch_size : int, default=32
    Images per forward pass.""",
    "device": """\
device : str or torch.device, default="auto"
    ``"auto"`` picks cuda, then mps, then cpu. Read each time the network runs, so an estimator
    fitted on a GPU machine also works on a CPU-only one.""",
    "precision": """\
precision : {"auto", "fp32", "bf16", "fp16"}, default="auto"
    Autocast dtype: ``"auto"`` is fp32 on CPU; on GPUs bf16 for training (fp16 where bf16 is
    missing) and fp16 for predictions (closer to fp32 than bf16).""",
    "featurizer_precision": """\
precision : {"auto", "fp32", "bf16", "fp16"}, default="auto"
    Autocast dtype: ``"auto"`` is fp16 on GPUs, bf16 on CPUs with native bf16 (AVX512-BF16 or
    AMX; 1.3x (b0, 64 px) to 2x (Lite0, 128 px) faster; features move by a median 0.5% (b0) to
    4% (Lite0) relative to fp32, transfer accuracy unchanged: benchmarks/README.md) and fp32 on
    other CPUs. ``"fp32"`` gives the same features on every machine.""",
    "num_workers": """\
num_workers : int or "auto", default="auto"
    DataLoader workers that read and decode images. ``"auto"`` suits them to the machine (none on
    two cores or fewer; see :func:`effsk.data.gpu_decode.resolve_num_workers`).""",
    "verbose": """\
verbose : int, default=0
    Show progress bars (and, when training, one line per epoch).""",
    "model_": """\
model_ : torch.nn.Module
    The network, in eval mode on the CPU. Predictions run on a prepared copy of it (BatchNorm
    folded, channels_last, on ``device``), which is never part of the estimator's state.""",
    "preprocessing_": """\
preprocessing_ : effsk.data.preprocessing.Preprocessing
    Resize, crop and normalisation applied to every image.""",
}

_PLACEHOLDER = re.compile(r"^([ \t]*)\{(\w+)\}[ \t]*$", re.MULTILINE)


def document_parameters(*tables: dict):
    """Class decorator: every docstring line that is just ``{name}`` becomes the shared numpydoc
    entry ``name`` of :data:`PARAMETER_DOCS` and ``tables`` (later tables win; a group's entries are
    looked up there too), indented like the placeholder."""
    entries = {k: v for table in (PARAMETER_DOCS, *tables) for k, v in table.items()}

    def text(name: str) -> str:
        if name not in entries:
            raise KeyError(f"docstring placeholder {{{name}}} names no shared parameter entry")
        entry = entries[name]
        return entry if isinstance(entry, str) else "\n".join(text(member) for member in entry)

    def fill(match: re.Match) -> str:
        indent, name = match.groups()
        return "\n".join(indent + line if line else line for line in text(name).splitlines())

    def decorate(cls):
        if cls.__doc__:  # None under python -OO
            cls.__doc__ = _PLACEHOLDER.sub(fill, cls.__doc__)
        return cls

    return decorate


def build_estimator_model(estimator, *, num_classes: int = 0, **kwargs):
    """``(model, preprocessing)`` for an estimator's ``phi``, ``weights``, ``scaling``, ``alpha``,
    ``beta`` and ``gamma``, through the one seam :func:`effsk.weights.build_model`."""
    if estimator.phi is None and (estimator.weights is None or str(estimator.weights).strip().lower() == "imagenet"):
        raise ValueError(
            f"{type(estimator).__name__}: phi=None means the variant stored in a checkpoint, so weights must be "
            f"the path of an effsk checkpoint; got weights={estimator.weights!r}. Pass a phi (e.g. 'b0') or a "
            "checkpoint path."
        )
    # through the module attribute, so that tests (and users) may substitute the builder
    return _weights.build_model(
        estimator.phi,
        estimator.weights,
        arch=estimator.arch,
        num_classes=num_classes,
        scaling=estimator.scaling,
        alpha=estimator.alpha,
        beta=estimator.beta,
        gamma=estimator.gamma,
        **kwargs,
    )


def input_preprocessing(estimator, preprocessing: Preprocessing) -> Preprocessing:
    """The weights' ``preprocessing`` with the estimator's ``resolution`` (when set) and ``crop``."""
    if estimator.resolution is not None:
        preprocessing = preprocessing.with_resolution(estimator.resolution)
    return replace(preprocessing, crop=estimator.crop)


def resolve_runtime(estimator) -> tuple[torch.device, torch.dtype | None]:
    """The estimator's ``device`` and its inference autocast dtype (``None`` = fp32) from
    ``precision``; an estimator whose inference gains from bf16 on CPU says so with ``_cpu_bf16 = True``."""
    device = resolve_device(estimator.device)
    cpu_bf16 = getattr(estimator, "_cpu_bf16", False)
    return device, resolve_precision(estimator.precision, device, inference=True, cpu_bf16=cpu_bf16)


# -- values derived from a fitted model, cached outside the estimator ------------------------------

# model -> {slot: (fingerprint of the weights, key, value)}. Weakly keyed, so an entry lives exactly as
# long as its model; a module-level table rather than an attribute, so that predicting never changes an
# estimator's state and pickles never carry the (device) copies.
_DERIVED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _weights_fingerprint(model: torch.nn.Module) -> tuple:
    """Changes whenever a parameter or buffer of ``model`` is replaced, moved or modified in place
    (an optimiser step, ``load_state_dict``, ``.to()``): tensors bump their version counter on every
    in-place write, and a replaced or moved tensor has another identity or address."""
    return tuple(
        (id(t), t.data_ptr(), -1 if t.is_inference() else t._version)
        for t in (*model.parameters(), *model.buffers())
    )


def derived_from_model(model: torch.nn.Module, slot: str, key, compute):
    """``compute(model)``, cached per ``model`` and ``slot`` while ``key`` and the weights stay the same.

    One value per slot is kept: asking with another ``key`` (say, another device) replaces it.
    """
    fingerprint = _weights_fingerprint(model)
    entries = _DERIVED.setdefault(model, {})
    entry = entries.get(slot)
    if entry is None or entry[0] != fingerprint or entry[1] != key:
        entry = entries[slot] = None  # drop the stale value before computing its replacement (device memory)
        entry = entries[slot] = (fingerprint, key, compute(model))
    return entry[2]


def _inference_copy(model: torch.nn.Module, device: torch.device, dtype: torch.dtype | None) -> torch.nn.Module:
    return optimize_for_inference(model, device=device, dtype=dtype, channels_last=True, fold_bn=True)


def prepared_model(model: torch.nn.Module, device: torch.device, dtype: torch.dtype | None) -> torch.nn.Module:
    """The inference copy of a fitted ``model``: frozen, eval mode, BatchNorm folded into the
    convolutions, channels_last, weights in ``dtype`` (the autocast dtype; ``None`` = fp32) on
    ``device``. ``model`` itself is left untouched; the copy is cached until its weights change."""
    return derived_from_model(model, "inference", (str(device), dtype), lambda m: _inference_copy(m, device, dtype))


def compiled_inference(
    model: torch.nn.Module,
    device: torch.device,
    dtype: torch.dtype | None,
    outputs: Callable,
    key: Hashable,
    *,
    what: str,
) -> CompiledOrEager:
    """``images -> outputs(inference copy of model, images)`` through ``torch.compile``, eager (with a
    warning naming ``what``) where compiling fails; the copy is :func:`prepared_model`'s.

    On CUDA the compiled forward replays as a CUDA graph (see :func:`effsk.nn.inference.compile_options`),
    so each call's output is only valid until the next call: consume it first. ``outputs`` must hold
    nothing of an estimator and ``key`` say everything it depends on: the function is cached beside
    ``model`` in :func:`prepared_model`'s slot (one device copy at a time), never in an estimator's state.
    """

    def build(m: torch.nn.Module) -> CompiledOrEager:
        copy_ = _inference_copy(m, device, dtype)

        def forward(images: torch.Tensor) -> torch.Tensor:
            return outputs(copy_, images)

        return CompiledOrEager(forward, options=compile_options(device, cudagraphs=True), what=what)

    return derived_from_model(model, "inference", (str(device), dtype, "compile", key), build)


def _model_outputs(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """What a batch gives a predictor: the network's outputs (logits or regression values)."""
    return model(images)


def _cpu_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of ``model`` with every tensor on the CPU, without a second copy on the GPU."""
    memo = {}
    for p in model.parameters():
        memo[id(p)] = torch.nn.Parameter(p.detach().to("cpu", copy=True), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = b.detach().to("cpu", copy=True)
    return copy.deepcopy(model, memo)


class PreparedInferenceMixin:
    """The one inference path of the estimators: batches of images through :func:`prepared_model`.

    Needs ``model_``, ``preprocessing_``, ``batch_size``, ``num_workers``, ``device``, ``precision``
    and ``verbose``; reads ``decode`` and ``backend`` where an estimator has them (the featurizer).
    Subclasses say what a batch gives in :meth:`_batch_outputs`.
    """

    def _batch_outputs(self) -> tuple[Callable, Hashable]:
        """``(outputs, key)``: ``outputs(prepared model, images)`` is what one batch gives, a function
        that holds nothing of the estimator (it may be compiled and cached beside ``model_``); ``key``
        names what it depends on."""
        return _model_outputs, None

    def _prepared_inference(self) -> tuple[Callable, torch.device, torch.dtype | None]:
        """``(forward, device, autocast dtype)`` for the current runtime parameters: ``forward(images)``
        runs :meth:`_batch_outputs` on the prepared copy of ``model_``, compiled for ``backend="compile"``."""
        check_is_fitted(self, "model_")
        device, dtype = resolve_runtime(self)
        outputs, key = self._batch_outputs()
        if getattr(self, "backend", "eager") == "compile":
            what = f"{type(self).__name__}(backend='compile')"
            return compiled_inference(self.model_, device, dtype, outputs, key, what=what), device, dtype
        return functools.partial(outputs, prepared_model(self.model_, device, dtype)), device, dtype

    def _inference_loader(self, X, device: torch.device, **kwargs):
        """Batches of ``X`` preprocessed in workers, or on ``device`` for ``decode="device"`` (nvJPEG on CUDA)."""
        workers = resolve_num_workers(self.num_workers, device)
        loader_kwargs = dict(batch_size=self.batch_size, num_workers=workers, **kwargs)
        if resolve_decode(getattr(self, "decode", "cpu"), device) == "device":
            return make_device_loader(X, self.preprocessing_, device=device, **loader_kwargs)
        return make_loader(X, self.preprocessing_, pin_memory=device.type == "cuda", **loader_kwargs)

    def _progress(self, total: int, desc: str):
        return tqdm(total=total, disable=not self.verbose, unit="img", desc=desc)

    def _forward_batch(self, forward, images, device, dtype) -> torch.Tensor:
        """One batch ``(B, 3, H, W)`` through ``forward`` (see :meth:`_prepared_inference`) -> float32 rows
        on ``device``."""
        images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with explain_oom(images, "predicting on"), autocast(device, dtype):
            return forward(images).float()

    def _forward(self, X) -> torch.Tensor:
        """Network outputs for every image of ``X``, float32 on the CPU."""
        forward, device, dtype = self._prepared_inference()
        loader = self._inference_loader(X, device)
        rows = []
        with self._progress(len(loader.dataset), "predict") as progress, torch.inference_mode():
            for images, _ in loader:
                rows.append(self._forward_batch(forward, images, device, dtype).cpu())
                progress.update(len(images))
        return torch.cat(rows)

    def __getstate__(self):
        state = dict(super().__getstate__())  # object.__getstate__ hands out the live __dict__
        if state.get("model_") is not None:
            # The network travels on the CPU, so a model fitted on a GPU unpickles anywhere.
            state["model_"] = _cpu_copy(state["model_"])
        return state
