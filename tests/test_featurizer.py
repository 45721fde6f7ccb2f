"""EfficientNetFeaturizer against torchvision (model and eval preset built here), scikit-learn's own
checks and integrations, the feature cache, and bad input."""

import copy
import os
import pickle
import warnings
from pathlib import Path

import joblib
import numpy as np
import pandas as pd
import pytest
import torch
import torchvision.models as tvm
from PIL import Image
from sklearn.base import clone
from sklearn.compose import ColumnTransformer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, cross_val_score
from sklearn.pipeline import Pipeline
from sklearn.utils import estimator_checks
from sklearn.utils._param_validation import InvalidParameterError
from torch import nn
from torchvision.transforms import InterpolationMode

from effsk import EfficientNetClassifier, EfficientNetFeaturizer
import effsk.utils.runtime
import effsk.weights
from effsk.data.images import ImageLoadError, ImageLoadWarning
from effsk.weights import build_model
from effsk.weights.checkpoint import save_checkpoint
from fitted_state import FittedState, assert_pickle_carries_only_the_fitted_state

CROP, RESIZE = 64, 73  # b0's 224/256 recipe at resolution 64
N_IMAGES = 6


def _calibrated_build_model(phi, weights=None, **kwargs):
    """build_model, seeded, with BatchNorm statistics measured on a batch like the test images.

    Random-init activations shrink towards zero with depth (features ~1e-14), which would let any
    absolute tolerance pass; measured statistics put features on a realistic scale.
    """
    torch.manual_seed(0)
    model, preprocessing = build_model(phi, weights, **{**kwargs, "drop_path_rate": 0.0})
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: one batch sets the statistics
    model.train()
    batch = (torch.rand(16, 3, CROP, CROP, generator=torch.Generator().manual_seed(1)) - 0.45) / 0.225
    with torch.no_grad():
        model.forward_features(batch)
    return model.eval(), preprocessing


def assert_close_scaled(actual, expected, tol):
    """|actual - expected| <= tol * max|expected|, elementwise, with features on a realistic scale."""
    scale = np.abs(expected).max()
    assert 0.1 < scale < 1e3
    np.testing.assert_allclose(actual, expected, rtol=0, atol=tol * scale)


@pytest.fixture(autouse=True)
def _calibrated_models(monkeypatch):
    monkeypatch.setattr(effsk.weights, "build_model", _calibrated_build_model)


@pytest.fixture(scope="module")
def photos():
    """Six RGB images whose shorter side is the resize size, so resizing is the identity everywhere."""
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, size=(RESIZE, 80 + 3 * i, 3), dtype=np.uint8) for i in range(N_IMAGES)]


@pytest.fixture
def paths(photos, tmp_path):
    out = []
    for i, pixels in enumerate(photos):
        out.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(pixels).save(out[-1])
    return out


def _featurizer(**params):
    # fp32 unless a test asks otherwise: precision="auto" is bf16 on CPUs with native bf16, and these
    # tests compare features with torchvision's fp32 network
    return EfficientNetFeaturizer(0, weights=None, resolution=CROP, **{"precision": "fp32", **params})


@pytest.fixture(scope="module")
def fitted():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(effsk.weights, "build_model", _calibrated_build_model)
        return _featurizer().fit()


def _with(fitted, **params):
    """A copy of a fitted featurizer with other runtime parameters (read at transform time)."""
    return copy.deepcopy(fitted).set_params(**params)


@pytest.fixture(scope="module")
def reference_maps(fitted, photos):
    """Feature maps of torchvision's efficientnet_b0 holding the featurizer's weights, fed by
    torchvision's own eval preset (on PIL images)."""
    tv = tvm.efficientnet_b0().eval()
    missing, unexpected = tv.load_state_dict(fitted.model_.state_dict(), strict=False)
    assert not unexpected and set(missing) == {"classifier.1.weight", "classifier.1.bias"}
    preset = type(tvm.EfficientNet_B0_Weights.IMAGENET1K_V1.transforms())(
        crop_size=CROP, resize_size=RESIZE, interpolation=InterpolationMode.BICUBIC
    )
    x = torch.stack([preset(Image.fromarray(p)) for p in photos])
    maps = {}
    with torch.no_grad():
        for i, module in enumerate(tv.features):
            x = maps[i] = module(x)
    return maps


REFERENCE_POOLS = {
    "avg": lambda m: torch.nn.functional.adaptive_avg_pool2d(m, 1).flatten(1),
    "max": lambda m: torch.nn.functional.adaptive_max_pool2d(m, 1).flatten(1),
    "avgmax": lambda m: (m.mean((2, 3)) + m.amax((2, 3))) / 2,  # timm's "avgmax"
    "gem": lambda m: torch.nn.functional.avg_pool2d(m.clamp(min=1e-6).pow(3), m.shape[-2:]).pow(1 / 3).flatten(1),
}


@pytest.mark.parametrize("pooling", list(REFERENCE_POOLS))
def test_features_match_torchvision_reference(fitted, photos, reference_maps, pooling):
    features = _with(fitted, pooling=pooling).transform(photos)
    assert features.dtype == np.float32 and features.shape == (N_IMAGES, 1280)
    assert_close_scaled(features, REFERENCE_POOLS[pooling](reference_maps[8]).numpy(), 1e-5)


def test_layers_concatenate_pooled_stages(fitted, photos, reference_maps):
    featurizer = clone(fitted).set_params(layers=[2, -1, 5]).fit()  # seeded: the same weights
    assert featurizer.layers_ == [2, 8, 5]
    features = featurizer.transform(photos)
    expected = torch.cat([REFERENCE_POOLS["avg"](reference_maps[i]) for i in (2, 8, 5)], 1).numpy()
    assert_close_scaled(features, expected, 1e-5)
    names = featurizer.get_feature_names_out()
    assert features.shape[1] == len(names) == 24 + 1280 + 112
    assert names[0] == "effsk_b0_avg_l2_0" and names[24] == "effsk_b0_avg_l8_0" and names[-1] == "effsk_b0_avg_l5_111"
    assert fitted.get_feature_names_out()[[0, -1]].tolist() == ["effsk_b0_avg_0", "effsk_b0_avg_1279"]


@pytest.mark.parametrize(
    "layers, message", [([], "is empty"), ([9], "is not a feature_info index"), ([1, -8], "twice")]
)
def test_bad_layers_are_refused(layers, message):
    with pytest.raises(ValueError, match=message):
        _featurizer(layers=layers).fit()


def test_batched_features_equal_one_at_a_time(fitted, photos, paths):
    batched = fitted.transform(paths)
    single = np.concatenate([fitted.transform([p]) for p in paths])
    assert_close_scaled(single, batched, 1e-5)
    assert_close_scaled(_with(fitted, batch_size=4).transform(paths), batched, 1e-5)


def test_every_container_gives_the_same_features(fitted, photos, paths):
    expected = fitted.transform(paths)
    same_size = [p[:, :80] for p in photos]
    cropped = fitted.transform(np.stack(same_size))
    as_inputs = {
        "list of arrays": photos,
        "list of bytes": [Path(p).read_bytes() for p in paths],
        "list of PIL": [Image.fromarray(p) for p in photos],
        "Series of paths": pd.Series(paths),
        "DataFrame": pd.DataFrame({"image": paths}),
    }
    for name, X in as_inputs.items():
        np.testing.assert_array_equal(fitted.transform(X), expected, err_msg=name)
    nchw = torch.from_numpy(np.stack(same_size)).permute(0, 3, 1, 2)
    np.testing.assert_array_equal(fitted.transform(nchw), cropped)
    np.testing.assert_array_equal(fitted.transform([p for p in same_size]), cropped)


def test_fit_loads_model_and_transform_requires_it(photos):
    featurizer = _featurizer()
    assert not hasattr(featurizer, "model_")
    with pytest.raises(Exception, match="not fitted"):
        featurizer.transform(photos)
    assert featurizer.fit(photos) is featurizer
    assert featurizer.preprocessing_.crop_size == CROP and featurizer.scaling_.name == "b0"
    assert not featurizer.model_.training


def test_on_error_nan_keeps_rows_and_warns_once(fitted, paths, tmp_path):
    clean = fitted.transform(paths)
    broken = tmp_path / "broken.png"
    broken.write_bytes(Path(paths[0]).read_bytes()[:100])
    X = paths[:2] + [str(tmp_path / "gone.png"), np.full((8, 8, 3), np.nan), str(broken)] + paths[2:]
    with pytest.raises(ImageLoadError, match=r"^image 2 \('.*gone\.png'\): file not found$"):
        fitted.transform(X)
    tolerant = _with(fitted, on_error="nan")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        features = tolerant.transform(X)
    (warning,) = [w for w in caught if issubclass(w.category, ImageLoadWarning)]
    message = str(warning.message)
    assert message.startswith("3 of 9 images could not be loaded")
    assert "image 2 (" in message and "file not found" in message
    assert "image 3: array contains NaN" in message and "image 4 (" in message
    assert features.shape == (9, 1280)
    assert np.isnan(features[2:5]).all()
    assert_close_scaled(features[[0, 1, 5, 6, 7, 8]], clean, 1e-5)


class _CountingForward:
    """Counts the images that reach the network."""

    def __init__(self, monkeypatch):
        self.images = 0
        original = EfficientNetFeaturizer._forward_batch

        def counting(featurizer, model, images, device, dtype):
            self.images += images.shape[0]
            return original(featurizer, model, images, device, dtype)

        monkeypatch.setattr(EfficientNetFeaturizer, "_forward_batch", counting)


def test_feature_cache_reuses_rows_and_is_never_stale(fitted, paths, photos, tmp_path, monkeypatch):
    counter = _CountingForward(monkeypatch)
    uncached = fitted.transform(paths)
    counter.images = 0
    cached = _with(fitted, memory=str(tmp_path / "cache"))

    np.testing.assert_array_equal(cached.transform(paths), uncached)
    assert counter.images == N_IMAGES
    np.testing.assert_array_equal(cached.transform(paths[::-1]), uncached[::-1])  # a rerun: all hits
    assert_close_scaled(cached.transform(photos[:3]), uncached[:3], 1e-5)  # same pixels, other container
    assert counter.images == N_IMAGES + 3  # arrays hash their pixels, files their bytes

    Image.fromarray(photos[0][::-1].copy()).save(paths[0])  # same path and size, new content
    changed = cached.transform(paths)
    assert counter.images == N_IMAGES + 4
    np.testing.assert_array_equal(changed[1:], uncached[1:])
    assert np.abs(changed[0] - uncached[0]).max() > 1e-3 * np.abs(uncached).max()
    refit = clone(cached).fit()  # seeded: identical weights, so the rows are reused
    np.testing.assert_array_equal(refit.transform(paths[1:3]), uncached[1:3])
    assert counter.images == N_IMAGES + 4
    assert_close_scaled(changed[:1], fitted.transform(paths[:1]), 1e-5)

    reweighted = clone(cached).fit()
    with torch.no_grad():  # other weights (as a new random init would give) must not read the old rows
        reweighted.model_.features[0][0].weight.mul_(1.01)
    configs = [_with(cached, pooling="max"), _with(cached, precision="bf16"), clone(cached).set_params(layers=[3]).fit()]
    for other in [reweighted, *configs]:
        before = counter.images
        other.transform(paths[1:3])
        assert counter.images == before + 2, other

    memory = joblib.Memory(tmp_path / "joblib", verbose=0)
    via_memory = _with(fitted, memory=memory)
    via_memory.transform(paths[1:3])
    via_memory.transform(paths[1:3])
    assert counter.images == before + 4
    assert any((tmp_path / "joblib").rglob("*.npy"))
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]


def test_workers_decode_and_hash_like_the_main_process(fitted, paths, tmp_path, monkeypatch):
    expected = fitted.transform(paths)
    counter = _CountingForward(monkeypatch)
    parallel = _with(fitted, num_workers=2, batch_size=4, memory=tmp_path / "cache")
    assert_close_scaled(parallel.transform(paths), expected, 1e-5)
    assert_close_scaled(parallel.transform(paths), expected, 1e-5)
    assert counter.images == N_IMAGES  # digests computed in workers match across runs


def test_cache_writes_are_atomic(tmp_path, monkeypatch):
    from effsk.data.cache import atomic_write_bytes

    target = tmp_path / "row.npy"
    atomic_write_bytes(target, b"old")

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["row.npy"]


def test_pickle_and_joblib_round_trips_transform_identically(fitted, paths, tmp_path):
    expected = fitted.transform(paths)
    state = fitted.__getstate__()
    assert all(t.device.type == "cpu" for t in state["model_"].state_dict().values())
    restored = pickle.loads(pickle.dumps(fitted))
    np.testing.assert_array_equal(restored.transform(paths), expected)
    joblib.dump(fitted, tmp_path / "featurizer.joblib")
    np.testing.assert_array_equal(joblib.load(tmp_path / "featurizer.joblib").transform(paths), expected)


def test_set_output_pandas_and_feature_names(fitted, paths):
    featurizer = _with(fitted).set_output(transform="pandas")
    frame = featurizer.transform(pd.Series(paths, index=[f"r{i}" for i in range(N_IMAGES)]))
    assert isinstance(frame, pd.DataFrame)
    assert list(frame.columns) == list(fitted.get_feature_names_out())
    assert list(frame.index) == [f"r{i}" for i in range(N_IMAGES)]
    np.testing.assert_array_equal(frame.to_numpy(), fitted.transform(paths))


def test_column_transformer_on_images_and_numbers(fitted, paths):
    frame = pd.DataFrame({"photo": paths, "age": np.arange(N_IMAGES, dtype=float), "weight": np.ones(N_IMAGES)})
    image_features = fitted.transform(paths)
    for columns in ("photo", ["photo"]):  # a Series and a one-column DataFrame reach the featurizer
        ct = ColumnTransformer([("img", clone(fitted), columns), ("num", "passthrough", ["age", "weight"])])
        out = ct.fit_transform(frame)
        assert out.shape == (N_IMAGES, 1282)
        np.testing.assert_array_equal(out[:, -2:], frame[["age", "weight"]].to_numpy())
        np.testing.assert_array_equal(out[:, :-2], image_features)  # the seeded refit is the same model
        names = ct.get_feature_names_out()
        assert names[0] == "img__effsk_b0_avg_0" and names[-1] == "num__weight"


def test_pipeline_grid_search_over_phi_and_cross_val_score(photos, monkeypatch):
    monkeypatch.setattr(effsk.weights, "build_model", build_model)  # plain random init is enough here
    X = [p[:32, :32] for p in photos] * 2
    y = np.array([0, 1] * N_IMAGES)
    pipe = Pipeline([("feat", _featurizer().set_params(resolution=32)), ("clf", LogisticRegression(max_iter=200))])
    search = GridSearchCV(pipe, {"feat__phi": [0, 0.5, 1]}, cv=2, error_score="raise").fit(X, y)
    assert [p["feat__phi"] for p in search.cv_results_["params"]] == [0, 0.5, 1]
    assert search.best_estimator_.named_steps["feat"].scaling_.phi == search.best_params_["feat__phi"]
    scores = cross_val_score(pipe, X, y, cv=2, error_score="raise")
    assert scores.shape == (2,) and np.all((0 <= scores) & (scores <= 1))


def test_phi_scaling_and_compound_bases_reach_the_model(monkeypatch):
    monkeypatch.setattr(effsk.weights, "build_model", build_model)
    featurizer = _featurizer(scaling="compound", gamma=1.2).set_params(phi=1).fit()
    assert featurizer.scaling_.mode == "compound" and featurizer.scaling_.resolution == 269
    assert featurizer.get_feature_names_out()[0] == "effsk_phi1_avg_0"
    assert _featurizer().set_params(phi=0.5).fit().get_feature_names_out()[0] == "effsk_phi0p5_avg_0"


def test_bf16_precision_on_cpu_stays_close(fitted, photos):
    fp32 = fitted.transform(photos)
    features = _with(fitted, precision="bf16").transform(photos)
    assert features.dtype == np.float32
    assert np.abs(features - fp32).max() > 1e-3 * np.abs(fp32).max()  # autocast really ran in bf16
    cosine = (features * fp32).sum(1) / np.linalg.norm(features, axis=1) / np.linalg.norm(fp32, axis=1)
    assert cosine.min() > 0.98


def test_verbose_shows_a_progress_bar(fitted, photos, capsys):
    _with(fitted, verbose=1).transform(photos)
    assert f"{N_IMAGES}/{N_IMAGES}" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("native_bf16", [True, False])
def test_auto_precision_takes_native_cpu_bf16_for_features_only(fitted, photos, monkeypatch, native_bf16):
    from effsk.estimators._base import resolve_runtime

    monkeypatch.setattr(effsk.utils.runtime, "native_cpu_bf16", lambda: native_bf16)
    auto = _with(fitted, precision="auto")
    assert resolve_runtime(auto)[1] == (torch.bfloat16 if native_bf16 else None)
    expected = _with(fitted, precision="bf16" if native_bf16 else "fp32").transform(photos[:2])
    np.testing.assert_array_equal(auto.transform(photos[:2]), expected)
    # fine-tuning trains and predicts in fp32 under "auto" on every CPU
    assert resolve_runtime(EfficientNetClassifier("b0", weights=None, precision="auto"))[1] is None


@pytest.mark.parametrize("bf16_supported", [True, False])
def test_auto_precision_on_gpus_trains_in_bf16_and_predicts_in_fp16(monkeypatch, bf16_supported):
    from effsk.utils.runtime import resolve_precision

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16_supported)
    cuda = torch.device("cuda")  # resolving a dtype needs no GPU
    assert resolve_precision("auto", cuda) == (torch.bfloat16 if bf16_supported else torch.float16)
    assert resolve_precision("auto", cuda, inference=True) == torch.float16
    assert resolve_precision("bf16", cuda, inference=True) == torch.bfloat16  # asked for: kept
    assert resolve_precision("auto", torch.device("cpu"), inference=True) is None


def test_native_cpu_bf16_needs_avx512_kernels(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert effsk.utils.runtime.native_cpu_bf16()
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")  # ATEN_CPU_CAPABILITY=avx2
    assert not effsk.utils.runtime.native_cpu_bf16()


def test_unusable_device_or_precision_fails_at_fit():
    with pytest.raises(ValueError, match="CUDA is not available"):
        _featurizer(device="cuda").fit()
    with pytest.raises(InvalidParameterError, match="'precision' parameter"):
        _featurizer(precision="fp8").fit()


def test_tags_say_the_input_is_images():
    tags = _featurizer().__sklearn_tags__()
    assert not tags.input_tags.two_d_array and tags.input_tags.string and tags.input_tags.three_d_array
    assert tags.requires_fit and not tags.target_tags.required


# scikit-learn's own checks that apply to a transformer whose input is images rather than a numeric
# matrix (check_estimator skips everything once two_d_array is False).
APPLICABLE_CHECKS = [
    "check_estimator_cloneable",
    "check_estimator_tags_renamed",
    "check_valid_tag_types",
    "check_estimator_repr",
    "check_no_attributes_set_in_init",
    "check_parameters_default_constructible",
    "check_get_params_invariance",
    "check_set_params",
    "check_do_not_raise_errors_in_init_or_set_params",
    "check_mixin_order",
    "check_transformers_unfitted",
    "check_param_validation",
]


@pytest.mark.parametrize("check", APPLICABLE_CHECKS)
def test_sklearn_estimator_checks(check):
    getattr(estimator_checks, check)("EfficientNetFeaturizer", _featurizer())


def test_transform_leaves_the_fitted_state_alone_and_pickles_without_copies(fitted, paths, tmp_path):
    featurizer = _with(fitted, memory=tmp_path / "cache")  # the cache needs the weights' identity too
    before, pickled = FittedState(featurizer), pickle.dumps(featurizer)
    expected = featurizer.transform(paths)
    before.assert_unchanged(featurizer)
    featurizer.set_params(precision="bf16")  # another prepared copy of the same model
    before = FittedState(featurizer)
    featurizer.transform(paths[:2])
    before.assert_unchanged(featurizer)
    featurizer.set_params(precision="fp32")
    restored = assert_pickle_carries_only_the_fitted_state(featurizer, pickled)
    np.testing.assert_array_equal(restored.transform(paths), expected)


def test_editing_the_fitted_weights_reaches_the_next_transform(fitted, photos, tmp_path):
    featurizer = _with(fitted, memory=tmp_path / "cache")
    first = featurizer.transform(photos)
    with torch.no_grad():
        featurizer.model_.features[0][0].weight.mul_(1.01)
    second = featurizer.transform(photos)  # neither a stale prepared copy nor stale cached rows
    assert np.abs(second - first).max() > 1e-4 * np.abs(first).max()
    np.testing.assert_array_equal(second, _with(featurizer, memory=None).transform(photos))


def test_phi_none_takes_the_checkpoints_variant(fitted, photos, tmp_path):
    path = save_checkpoint(tmp_path / "b0.pt", fitted.model_, fitted.preprocessing_)
    from_checkpoint = EfficientNetFeaturizer(None, weights=path, precision="fp32").fit()
    assert from_checkpoint.scaling_.name == "b0" and from_checkpoint.preprocessing_ == fitted.preprocessing_
    for key, value in fitted.model_.state_dict().items():
        assert torch.equal(from_checkpoint.model_.state_dict()[key], value), key
    assert_close_scaled(from_checkpoint.transform(photos), fitted.transform(photos), 1e-6)
    for weights in ("imagenet", None):
        with pytest.raises(ValueError, match=r"EfficientNetFeaturizer: phi=None .* effsk checkpoint"):
            EfficientNetFeaturizer(None, weights=weights).fit()
    torch.save(fitted.model_.state_dict(), tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="phi=None is only allowed with weights=<effsk checkpoint path>, not a plain state_dict"):
        EfficientNetFeaturizer(None, weights=tmp_path / "plain.pt").fit()


def test_cli_featurize_defaults_to_the_estimators_phi(monkeypatch, tmp_path):
    import effsk.cli
    import effsk.jobs.featurize
    from effsk.cli import main

    seen = []
    monkeypatch.setattr(effsk.jobs.featurize, "featurize_to_parquet",
                        lambda source, output, *, featurizer, **kwargs: seen.append(featurizer.phi) or output)
    monkeypatch.setattr(effsk.cli, "_report_failures", lambda output: None)  # no file was written
    assert main(["featurize", str(tmp_path), str(tmp_path / "out.parquet"), "--quiet"]) == 0
    # a default the command line cannot have copied as a literal
    monkeypatch.setattr(EfficientNetFeaturizer.__init__, "__defaults__", ("b3",))
    assert main(["featurize", str(tmp_path), str(tmp_path / "out.parquet"), "--quiet"]) == 0
    assert seen == ["b0", "b3"] and EfficientNetFeaturizer().phi == "b3"
