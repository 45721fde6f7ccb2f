"""Frozen-inference copies of a network: BatchNorm folded, channels_last, reduced precision, compiled.

Training keeps BatchNorm as a separate op; frozen inference does not need it. Folding each BatchNorm into
the convolution before it removes a full read and write of every feature map, and channels_last lets
oneDNN (CPU) and cuDNN (GPU) pick their fastest convolution kernels for the depthwise and 1x1 convolutions
that dominate EfficientNet. Measurements behind the defaults are in ``benchmarks/README.md``.
"""

from __future__ import annotations

import copy
import warnings
from collections import OrderedDict

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from ..utils.runtime import resolve_device

__all__ = ["optimize_for_inference", "fold_batchnorm", "BACKENDS", "CompiledOrEager", "compile_options"]

BACKENDS = ("eager", "compile")
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold every ``BatchNorm2d`` that directly follows a ``Conv2d`` in an ``nn.Sequential`` into it.

    The convolution's weight and bias absorb the normalisation (``torch.nn.utils.fusion``) and the
    BatchNorm is replaced by ``nn.Identity``, so module names and indices stay as they were. Works in
    place on a model in ``eval()`` mode and returns it. That pattern covers every conv-BN pair of the
    EfficientNet family (torchvision's ``Conv2dNormActivation`` is such a Sequential).

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4)).eval()
    >>> x = torch.randn(1, 3, 8, 8)
    >>> expected = net(x)
    >>> folded = fold_batchnorm(net)
    >>> type(folded[1]).__name__, torch.allclose(folded(x), expected, atol=1e-6)
    ('Identity', True)
    """
    if model.training:
        raise ValueError("fold_batchnorm needs a model in eval() mode: folding freezes the BatchNorm statistics")
    for parent in model.modules():
        if not isinstance(parent, nn.Sequential):
            continue
        names = list(parent._modules)
        for conv_name, bn_name in zip(names, names[1:]):
            conv, bn = parent._modules[conv_name], parent._modules[bn_name]
            if (
                isinstance(conv, nn.Conv2d)
                and isinstance(bn, nn.BatchNorm2d)
                and bn.running_mean is not None
                and bn.num_features == conv.out_channels
            ):
                parent._modules[conv_name] = fuse_conv_bn_eval(conv, bn)
                parent._modules[bn_name] = nn.Identity()
    return model


class _GlobalAvgPool(nn.Module):
    """``AdaptiveAvgPool2d(1)`` through the adaptive-pool kernel itself.

    For a 1x1 output ``adaptive_avg_pool2d`` dispatches to ``mean()``, which on a channels_last bf16 CPU
    tensor first copies the whole map to fp32: about 20x slower than the pooling kernel (torch 2.14,
    B0's squeeze-excite maps), and the squeeze-excite pools then cost as much as all 1x1 convolutions.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._adaptive_avg_pool2d(x, [1, 1])


def _use_pooling_kernel(model: nn.Module) -> None:
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.AdaptiveAvgPool2d) and child.output_size in (1, (1, 1)):
                setattr(parent, name, _GlobalAvgPool())


class _InputAdapter:
    """Forward pre-hook: give the input the dtype and memory format of the weights it meets."""

    def __init__(self, dtype: torch.dtype, memory_format: torch.memory_format):
        self.dtype = dtype
        self.memory_format = memory_format

    def __call__(self, module, args):
        x, *rest = args
        if x.is_floating_point() and x.dim() == 4:
            x = x.to(dtype=self.dtype, memory_format=self.memory_format)
        return (x, *rest)


def compile_options(device, *, cudagraphs: bool = False) -> dict:
    """inductor options for frozen inference on ``device``.

    ``freezing`` turns the weights into constants, which lets inductor fold and pre-pack them (for oneDNN
    on CPU). ``cudagraphs`` (CUDA only) replays each compiled forward as one CUDA graph, what
    ``mode="reduce-overhead"`` does (``torch.compile`` takes a mode or options, not both): EfficientNet
    runs hundreds of small kernels per forward (depthwise convolutions, squeeze-excite, activations),
    whose launches the graph removes. ``"max-autotune"`` modes would instead spend minutes benchmarking
    matmul and convolution kernels, which are not what limits EfficientNet. A graph's outputs are
    overwritten by its next replay, so only callers that consume each output before the next call may
    ask for it.

    >>> compile_options("cpu", cudagraphs=True)
    {'freezing': True}
    """
    options = {"freezing": True}
    if cudagraphs and torch.device(device).type == "cuda":
        options["triton.cudagraphs"] = True
    return options


class CompiledOrEager:
    """``function(x)`` through ``torch.compile``, compiled on the first call; eager from the first failure on.

    When compiling or running the compiled code fails (no C++ compiler or Triton, a platform without
    dynamo, an operator the compiler refuses), ``function`` runs eagerly for that call and every later
    one, after one :class:`RuntimeWarning` that names ``what`` and the compiler's reason. An input the
    eager function refuses raises the eager error. The batch dimension of ``x`` is symbolic from the
    start, so the smaller last batch of a dataset reuses the compiled code. Pickles (and deep-copies)
    without the compiled code, which is rebuilt on the next call.

    >>> double = CompiledOrEager(lambda x: 2 * x, options=compile_options("cpu"))
    >>> double.failed, double.compiled is None
    (False, True)
    """

    def __init__(self, function, *, options: dict | None = None, what: str = "the optimised model"):
        self.function = function
        self.options = dict(options or {})
        self.what = what
        self.compiled = None
        self.failed = False

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.failed:
            return self.function(x)
        try:
            if self.compiled is None:
                self.compiled = torch.compile(self.function, options=self.options)
            torch._dynamo.maybe_mark_dynamic(x, 0)
            return self.compiled(x)
        except Exception as exc:  # noqa: BLE001 - whatever broke the compiler, eager decides
            out = self.function(x)  # a bad input raises its own, eager error here
            self.failed, self.compiled = True, None
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            warnings.warn(
                f"torch.compile failed ({type(exc).__name__}: {reason}); running {self.what} eagerly",
                RuntimeWarning,
                stacklevel=3,
            )
            return out

    def __getstate__(self):
        return {**self.__dict__, "compiled": None}


class _CompiledStages(nn.Sequential):
    """``features`` whose forward runs through ``torch.compile`` (:class:`CompiledOrEager`, no CUDA
    graphs: callers may keep the feature maps); indexing still yields the eager stages.

    Compilation happens on the first call (and again when the spatial size changes).
    """

    def __init__(self, stages: nn.Sequential):
        super().__init__(OrderedDict(stages.named_children()))
        self._runner = None

    def __getitem__(self, idx):
        # nn.Sequential slices into its own class; a slice of stages (forward_intermediates) is eager.
        if isinstance(idx, slice):
            return nn.Sequential(OrderedDict(list(self.named_children())[idx]))
        return super().__getitem__(idx)

    def _eager(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._runner is None:
            self._runner = CompiledOrEager(self._eager, options=compile_options(x.device))
        return self._runner(x)


def _warn_if_bf16_is_emulated(device: torch.device, dtype) -> None:
    if dtype is not torch.bfloat16 or device.type != "cpu":
        return
    try:
        native = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    except (AttributeError, RuntimeError):  # private probe: if it is gone, assume the CPU copes
        return
    if not native:
        warnings.warn(
            "this CPU has no native bf16 instructions (AVX512-BF16/AMX); bf16 inference is emulated "
            "and is likely slower than fp32",
            RuntimeWarning,
            stacklevel=3,
        )


def optimize_for_inference(
    model: nn.Module,
    *,
    device,
    dtype: torch.dtype | None = None,
    channels_last: bool = True,
    fold_bn: bool = True,
    backend: str = "eager",
) -> nn.Module:
    """A frozen copy of ``model`` made fast for inference; ``model`` itself is left untouched.

    The copy is in ``eval()`` mode with gradients off, of the same class, with the same
    ``forward_features`` / ``forward_intermediates`` / ``forward_head`` / ``feature_info``, so the
    featurizer pools from it exactly as from the original. Inputs are converted to the copy's dtype
    and memory format on entry; outputs come in ``dtype``. Call it inside ``torch.inference_mode()``.

    Parameters
    ----------
    model : nn.Module
        An effsk network (e.g. :class:`~effsk.nn.EfficientNet`) or any module whose conv-BN pairs sit
        in ``nn.Sequential`` containers.
    device : str or torch.device
        Where the copy lives (``"auto"`` as in :func:`effsk.utils.runtime.resolve_device`).
    dtype : torch.dtype, optional
        ``torch.bfloat16`` or ``torch.float16`` casts the weights (after folding, which happens in
        float32). Weights rather than autocast: on CPU the cast model measured as fast as autocast while
        holding half the weight memory, and it needs no context manager around every call.
        ``None`` keeps float32.
    channels_last : bool, default=True
        Store weights (and convert inputs) in NHWC layout.
    fold_bn : bool, default=True
        Fold BatchNorm into the preceding convolution (see :func:`fold_batchnorm`).
    backend : {"eager", "compile"}, default="eager"
        ``"compile"`` runs ``forward_features`` through ``torch.compile`` (inductor, with weight
        freezing). It is faster per image but the first call compiles for tens of seconds on a
        small CPU; when compilation fails the copy warns and runs eagerly. ``forward_intermediates``
        always runs eagerly.

    Returns
    -------
    nn.Module
        The optimised copy. Its weights are frozen: train or fine-tune the original, not this.

    Examples
    --------
    >>> import torch
    >>> from effsk.nn import efficientnet
    >>> model = efficientnet(0.0, num_classes=0).eval()
    >>> fast = optimize_for_inference(model, device="cpu")
    >>> x = torch.randn(2, 3, 32, 32)
    >>> with torch.inference_mode():
    ...     (fast.forward_features(x) - model.forward_features(x)).abs().max().item() < 1e-4
    True
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}; use one of {BACKENDS}")
    if dtype is not None and dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r}; use None or one of {_DTYPES}")
    device = resolve_device(device)
    dtype = dtype or torch.float32
    _warn_if_bf16_is_emulated(device, dtype)

    fast = copy.deepcopy(model).eval().requires_grad_(False)
    if fold_bn:
        fold_batchnorm(fast)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    fast.to(device=device, dtype=dtype, memory_format=memory_format)
    if device.type == "cpu":
        _use_pooling_kernel(fast)

    features = getattr(fast, "features", None)
    entry = features[0] if isinstance(features, nn.Sequential) and len(features) else fast
    entry.register_forward_pre_hook(_InputAdapter(dtype, memory_format))
    if backend == "compile" and isinstance(features, nn.Sequential):
        fast.features = _CompiledStages(features)
    return fast
