"""EfficientNetFeaturizer: images -> pooled EfficientNet features, as a scikit-learn transformer."""

from __future__ import annotations

import functools
import numbers
import os
import warnings
from numbers import Integral

import numpy as np
import torch
from sklearn.base import BaseEstimator, TransformerMixin, _fit_context
from sklearn.utils._param_validation import HasMethods, Interval, StrOptions
from sklearn.utils.validation import check_is_fitted
from torch.utils.data import DataLoader, Dataset

from ..data.cache import open_feature_cache, weights_identity
from ..data.gpu_decode import DECODERS, resolve_decode, resolve_num_workers
from ..data.images import ON_ERROR, ImageLoadWarning, _items, item_digest, num_images
from ..nn.inference import BACKENDS
from ..utils.runtime import resolve_device
from ._base import (
    CROP_CONSTRAINTS,
    DEFAULT_CROP,
    MODEL_PARAMETER_CONSTRAINTS,
    RUNTIME_PARAMETER_CONSTRAINTS,
    PreparedInferenceMixin,
    build_estimator_model,
    derived_from_model,
    document_parameters,
    input_preprocessing,
    resolve_runtime,
)

__all__ = ["EfficientNetFeaturizer", "POOLINGS"]

POOLINGS = ("avg", "max", "avgmax", "gem")
GEM_P = 3.0
_GEM_EPS = 1e-6
_LISTED_FAILURES = 20


def _pool(feature_map: torch.Tensor, pooling: str) -> torch.Tensor:
    """``(N, C, H, W)`` -> ``(N, C)`` float32, computed in fp32 whatever the autocast dtype."""
    x = feature_map.float()
    if pooling == "avg":
        return x.mean((2, 3))
    if pooling == "max":
        return x.amax((2, 3))
    if pooling == "avgmax":  # timm's "avgmax": the mean of the two, same width
        return 0.5 * (x.mean((2, 3)) + x.amax((2, 3)))
    # GeM (Radenovic et al. 2018); SiLU maps can be slightly negative, hence the clamp.
    return x.clamp(min=_GEM_EPS).pow(GEM_P).mean((2, 3)).pow(1.0 / GEM_P)


def _pooled_features(model, images: torch.Tensor, *, layers: tuple[int, ...], pooling: str) -> torch.Tensor:
    """``(B, 3, H, W)`` -> ``(B, n_features)``: the feature maps of ``layers``, pooled and concatenated."""
    maps = model.forward_intermediates(images, list(layers))
    return torch.cat([_pool(feature_map, pooling) for feature_map in maps], dim=1)


class _Digests(Dataset):
    """Content digests of the items of ``X``, computed in DataLoader workers like decoding."""

    def __init__(self, X):
        self._items = _items(X)

    def __len__(self):
        return len(self._items)

    def __getitem__(self, index):
        return item_digest(self._items[index])


@document_parameters()
class EfficientNetFeaturizer(PreparedInferenceMixin, TransformerMixin, BaseEstimator):
    """Images -> pooled features of an EfficientNet backbone.

    Parameters
    ----------
    {model_parameters}
    pooling : {"avg", "max", "avgmax", "gem"}, default="avg"
        Global pooling of each feature map; ``"avgmax"`` is the mean of average and max pooling,
        ``"gem"`` generalised-mean pooling with p = 3.
    layers : list of int, optional
        Entries of the model's ``feature_info`` to pool and concatenate (0 = stem, 1..7 = the MBConv
        stages, 8 or -1 = the head convolution). ``None`` gives the head's features only.
    resolution : int, optional
        Crop size fed to the network; defaults to the weights' preprocessing (the resize keeps its
        ratio to the crop).
    {crop}
    {batch_size}
    {device}
    {featurizer_precision}
    {num_workers}
    decode : {"auto", "cpu", "device"}, default="auto"
        Where images are decoded and preprocessed. ``"cpu"``: in the DataLoader workers, batches
        shipped to ``device`` from pinned memory. ``"device"``: the workers only read files; JPEGs are
        decoded in batches on ``device`` (nvJPEG on CUDA) and every image is resized, cropped and
        normalised there; other formats, arrays and the JPEGs the device decoder does not take are
        decoded on the CPU (see :mod:`effsk.data.gpu_decode`). ``"auto"``: ``"device"`` on CUDA when
        torchvision's ``decode_jpeg`` is available, else ``"cpu"``. On CUDA the two decoders differ by
        a level or two per pixel (nvJPEG's IDCT and chroma upsampling), so feature caches keep them apart.
    backend : {"eager", "compile"}, default="eager"
        ``"compile"`` runs the network and pooling through ``torch.compile`` (inductor, weights frozen
        as constants; on CUDA each batch replays as a CUDA graph, which removes the launch cost of
        EfficientNet's many small kernels). The first ``transform`` then compiles, for tens of seconds
        to minutes (again after a change of resolution, device, precision, layers or pooling): worth it
        for large jobs. Where compiling fails (no C++ compiler or Triton, an unsupported platform) a
        warning says why and the network runs eagerly. Features equal eager ones to the rounding of the
        precision used (rows cached with ``memory`` are kept apart by backend). The compiled code lives beside
        the fitted model, never in the estimator's state; one compiled featurizer must not run
        ``transform`` from two threads at once (a CUDA graph's output lives until its next replay).
    memory : str, path or joblib.Memory, optional
        Where to cache feature rows per image, keyed on image content and everything that changes
        features; reruns and cross-validation folds reuse them.
    on_error : {"raise", "nan"}, default="raise"
        What an image that cannot be loaded does: raise :class:`~effsk.data.images.ImageLoadError`, or
        give a row of NaN (with one :class:`~effsk.data.images.ImageLoadWarning` listing the failures).
    {verbose}

    Attributes
    ----------
    {model_}
    {preprocessing_}
    scaling_ : Scaling
        The resolved variant.
    layers_ : list of int
        The ``feature_info`` entries that are pooled.

    Examples
    --------
    >>> import numpy as np
    >>> from effsk import EfficientNetFeaturizer
    >>> X = np.random.default_rng(0).integers(0, 256, size=(2, 48, 48, 3), dtype=np.uint8)
    >>> featurizer = EfficientNetFeaturizer("b0", weights=None, resolution=32).fit(X)
    >>> featurizer.transform(X).shape
    (2, 1280)
    >>> featurizer.get_feature_names_out()[:2].tolist()
    ['effsk_b0_avg_0', 'effsk_b0_avg_1']
    """

    _cpu_bf16 = True  # precision="auto" takes native bf16 on CPU: faster, same transfer accuracy (issue 16)
    _parameter_constraints: dict = {
        **MODEL_PARAMETER_CONSTRAINTS,
        "pooling": [StrOptions(set(POOLINGS))],
        "layers": [None, "array-like"],
        "resolution": [None, Interval(Integral, 1, None, closed="left")],
        **CROP_CONSTRAINTS,
        **RUNTIME_PARAMETER_CONSTRAINTS,
        "memory": [None, str, os.PathLike, HasMethods(["cache"])],
        "on_error": [StrOptions(set(ON_ERROR))],
        "decode": [StrOptions(set(DECODERS))],
        "backend": [StrOptions(set(BACKENDS))],
    }

    def __init__(
        self,
        phi="b0",
        *,
        weights="imagenet",
        arch="efficientnet",
        scaling="official",
        alpha=None,
        beta=None,
        gamma=None,
        pooling="avg",
        layers=None,
        resolution=None,
        crop=DEFAULT_CROP,
        batch_size=32,
        device="auto",
        precision="auto",
        num_workers="auto",
        decode="auto",
        backend="eager",
        memory=None,
        on_error="raise",
        verbose=0,
    ):
        self.phi = phi
        self.weights = weights
        self.scaling = scaling
        self.arch = arch
        self.alpha = alpha
        self.beta = beta
        self.gamma = gamma
        self.pooling = pooling
        self.layers = layers
        self.resolution = resolution
        self.crop = crop
        self.batch_size = batch_size
        self.device = device
        self.precision = precision
        self.num_workers = num_workers
        self.decode = decode
        self.backend = backend
        self.memory = memory
        self.on_error = on_error
        self.verbose = verbose

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        # X is a collection of images (paths, bytes, arrays), not a numeric 2-D feature matrix.
        tags.input_tags.two_d_array = False
        tags.input_tags.three_d_array = True
        tags.input_tags.string = True
        tags.transformer_tags.preserves_dtype = ["float32"]
        tags.target_tags.required = False
        return tags

    # ----------------------------------------------------------------------------------------------
    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X=None, y=None):
        """Resolve ``phi`` and load the model. ``X`` is only checked (when given); ``y`` is ignored.

        Returns
        -------
        self
        """
        if X is not None:
            num_images(X)
        resolve_runtime(self)  # an unusable device or precision fails now, not after loading weights
        model, preprocessing = build_estimator_model(self, num_classes=0)
        self.layers_ = self._resolve_layers(model)
        self.model_ = model.eval()
        self.preprocessing_ = input_preprocessing(self, preprocessing)
        self.scaling_ = model.scaling
        return self

    @property
    def _n_features_out(self) -> int:
        """Output width (scikit-learn's name for it); derived from the fitted model and layers."""
        return sum(self.model_.feature_info[i]["channels"] for i in self.layers_)

    def _resolve_layers(self, model) -> list[int]:
        n = len(model.feature_info)
        if self.layers is None:
            return [n - 1]
        layers = list(self.layers)
        valid = f"integers in 0..{n - 1} (0 = stem, 1..{n - 2} = MBConv stages, {n - 1} = head) or negative indices"
        if not layers:
            raise ValueError(f"layers={self.layers!r} is empty; pass None for the head's features, or {valid}.")
        for layer in layers:
            if isinstance(layer, bool) or not isinstance(layer, numbers.Integral) or not -n <= layer < n:
                raise ValueError(f"layers={self.layers!r}: {layer!r} is not a feature_info index; use {valid}.")
        resolved = [int(layer) % n for layer in layers]
        if len(set(resolved)) != len(resolved):
            raise ValueError(f"layers={self.layers!r} names the same entry twice.")
        return resolved

    # ----------------------------------------------------------------------------------------------
    def transform(self, X):
        """Pooled features of each image.

        Parameters
        ----------
        X : images
            A sequence of paths, bytes, PIL images or arrays; an (N, H, W[, C]) array; an (N, C, H, W)
            tensor (see :mod:`effsk.data.images`).

        Returns
        -------
        ndarray of shape (n_samples, n_features), float32
        """
        check_is_fitted(self)
        n = num_images(X)
        device, dtype = resolve_runtime(self)
        features = np.empty((n, self._n_features_out), dtype=np.float32)
        cache = self._feature_cache(device, dtype)
        todo, keys = np.arange(n), None
        if cache is not None:
            keys = self._digests(X)
            cached = [cache.get(key) for key in keys]
            for i, row in enumerate(cached):
                if row is not None:
                    features[i] = row
            todo = np.array([i for i, row in enumerate(cached) if row is None], dtype=np.int64)
        failures = self._featurize(X, todo, features, cache, keys) if len(todo) else []
        if failures:
            _warn_failures(failures, n)
        return features

    def _featurize(self, X, todo, features, cache, keys) -> list:
        """Fill ``features[todo]``; return the load failures as ``(index, path, reason)``."""
        forward, device, dtype = self._prepared_inference()
        loader = self._inference_loader(X, device, on_error=self.on_error, indices=todo, return_errors=True)
        failures = []
        with self._progress(len(todo), f"effsk {self.scaling_.label}") as progress, torch.inference_mode():
            for images, indices, errors in loader:
                indices = indices.numpy()
                failed = np.isin(indices, [index for index, _, _ in errors])
                if failed.any():
                    images[torch.from_numpy(failed).to(images.device)] = 0  # NaN placeholders never enter the network
                rows = self._forward_batch(forward, images, device, dtype).cpu().numpy()
                rows[failed] = np.nan
                features[indices] = rows
                if cache is not None:
                    for index, row in zip(indices[~failed], rows[~failed]):
                        cache.put(keys[index], row)
                failures.extend(errors)
                progress.update(len(indices))
        return failures

    def _batch_outputs(self):
        """The chosen feature maps, pooled and concatenated (see PreparedInferenceMixin)."""
        layers = tuple(self.layers_)
        return functools.partial(_pooled_features, layers=layers, pooling=self.pooling), (layers, self.pooling)

    # ----------------------------------------------------------------------------------------------
    def _feature_cache(self, device, dtype):
        if self.memory is None:
            return None
        config = {
            "model": type(self.model_).__name__,
            "scaling": self.scaling_.as_dict(),
            "same_padding": bool(getattr(self.model_, "same_padding", False)),
            # hashed once per set of weights, outside the estimator's state
            "weights": derived_from_model(self.model_, "weights_identity", None, weights_identity),
            "preprocessing": self.preprocessing_.to_dict(),
            "pooling": self.pooling,
            "gem_p": GEM_P,
            "layers": self.layers_,
            "device": device.type,
            "autocast": str(dtype),
        }
        if self.backend != "eager":  # compiled kernels round differently: at bf16/fp16 about 1e-2 relative
            config["backend"] = self.backend
        if device.type != "cpu" and resolve_decode(self.decode, device) == "device":
            # nvJPEG's pixels differ from libjpeg's by a level or two (more than the 1e-4 that keeps devices
            # apart above). On the CPU both decoders are libjpeg-turbo followed by the same resize: one key.
            config["decode"] = "device"
        return open_feature_cache(self.memory, config, self._n_features_out)

    def _digests(self, X) -> list:
        workers = resolve_num_workers(self.num_workers, resolve_device(self.device))
        loader = DataLoader(_Digests(X), batch_size=self.batch_size, num_workers=workers, collate_fn=list)
        return [key for batch in loader for key in batch]

    # ----------------------------------------------------------------------------------------------
    def get_feature_names_out(self, input_features=None):
        """``effsk_<variant>_<pooling>_<i>``, with ``_l<layer>`` before ``<i>`` when ``layers`` is set.

        ``input_features`` is ignored: the input is images, not named columns.
        """
        check_is_fitted(self)
        variant = self.scaling_.name or f"phi{self.scaling_.phi:g}".replace(".", "p")
        prefix = f"effsk_{variant}_{self.pooling}"
        head_only = self.layers_ == [len(self.model_.feature_info) - 1]
        names = []
        for layer in self.layers_:
            stem = prefix if head_only else f"{prefix}_l{layer}"
            names.extend(f"{stem}_{i}" for i in range(self.model_.feature_info[layer]["channels"]))
        return np.asarray(names, dtype=object)


def _warn_failures(failures: list, n: int) -> None:
    failures = sorted(failures, key=lambda failure: failure[0])
    lines = [
        f"  image {index}" + (f" ({path!r})" if path is not None else "") + f": {reason}"
        for index, path, reason in failures[:_LISTED_FAILURES]
    ]
    if len(failures) > _LISTED_FAILURES:
        lines.append(f"  ... and {len(failures) - _LISTED_FAILURES} more")
    warnings.warn(
        f"{len(failures)} of {n} images could not be loaded; their feature rows are NaN:\n" + "\n".join(lines),
        ImageLoadWarning,
        stacklevel=3,
    )
