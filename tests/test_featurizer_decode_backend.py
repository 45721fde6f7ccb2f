"""EfficientNetFeaturizer's ``decode`` and ``backend`` on the CPU: JPEGs decoded and preprocessed by the
device path (libjpeg-turbo here, nvJPEG on CUDA) against the worker path, errors, pinned memory, the
feature cache key; ``torch.compile`` wired in (a stand-in compiler: compiling even a tiny EfficientNet
takes 40 s on this CPU) and its fallback to eager. The real compiler and nvJPEG run in test_gpu.py."""

import io
import pickle
import re
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_sample_images
from sklearn.utils._param_validation import InvalidParameterError
from fitted_state import measure_batchnorm

from effsk import EfficientNetFeaturizer
from effsk.data import gpu_decode
from effsk.data.gpu_decode import DeviceDecodeLoader, resolve_decode
from effsk.data.images import ImageLoader, ImageLoadError, ImageLoadWarning
from effsk.data.transforms import eval_transform
from effsk.estimators import _base
from effsk.nn.inference import CompiledOrEager

PHOTOS = load_sample_images().images  # china.jpg, flower.jpg (427x640)
# Features of one image move by ~1e-4 of their scale when one input pixel rounds one level the other way;
# measured here: the two paths give bit-identical features (same libjpeg-turbo, same batched resize).
TOLERANCE = 1e-3


def jpeg(array, **save):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=90, **save)
    return buffer.getvalue()


def crop(k, height, width):
    photo = PHOTOS[k % 2]
    y, x = 37 * k % (photo.shape[0] - height), 53 * k % (photo.shape[1] - width)
    return np.ascontiguousarray(photo[y:y + height, x:x + width])


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """JPEG files and bytes (baseline, progressive, grayscale) of several sizes, two of one size, mixed
    with what the device path decodes on the CPU: a PNG, an EXIF-rotated JPEG, an array."""
    folder = tmp_path_factory.mktemp("decode")
    paths = []
    for k, (h, w) in enumerate([(90, 120), (120, 90), (100, 100)]):
        paths.append(str(folder / f"{k}.jpg"))
        Image.fromarray(crop(k, h, w)).save(paths[-1], quality=90)
    png = folder / "a.png"
    Image.fromarray(crop(5, 80, 110)).save(png)
    exif = Image.Exif()
    exif[0x0112] = 6
    X = [
        paths[0],
        jpeg(crop(3, 90, 120)),  # the size of paths[0]: resized together with it
        str(png),
        jpeg(crop(4, 110, 140), progressive=True),
        paths[1],
        crop(6, 70, 96),
        jpeg(crop(7, 100, 80)[..., 0]),  # grayscale
        jpeg(crop(8, 90, 100), exif=exif),
        paths[2],
    ]
    return X


@pytest.fixture(scope="module")
def fitted():
    featurizer = EfficientNetFeaturizer(0, weights=None, resolution=64, device="cpu", precision="fp32", batch_size=4)
    featurizer.fit()
    # BatchNorm statistics of photo crops: random-init features barely depend on the image otherwise
    photos = [torch.from_numpy(crop(k, 64 + 5 * k, 64 + 7 * k)).permute(2, 0, 1) for k in range(16)]
    measure_batchnorm(featurizer.model_, eval_transform(featurizer.preprocessing_).batch(photos))
    return featurizer


def featurizer_like(fitted, **params):
    return pickle.loads(pickle.dumps(fitted)).set_params(**params)


def assert_close_scaled(actual, expected, tol):
    scale = np.abs(expected).max()
    assert 0.1 < scale < 1e3, scale
    np.testing.assert_allclose(actual, expected, rtol=0, atol=tol * scale)


def device_decoded_count(monkeypatch):
    """Counts the images handed to the device JPEG decoder (so that no test passes on the CPU path alone)."""
    counts = []
    real = gpu_decode._device_jpeg_decode

    def counting(encoded, device):
        counts.append(len(encoded) if isinstance(encoded, list) else 1)
        return real(encoded, device)

    monkeypatch.setattr(gpu_decode, "_device_jpeg_decode", counting)
    return counts


# -- decode ----------------------------------------------------------------------------------------

def test_device_decode_equals_cpu_decode(fitted, mixed, monkeypatch):
    expected = featurizer_like(fitted, decode="cpu").transform(mixed)
    counts = device_decoded_count(monkeypatch)
    got = featurizer_like(fitted, decode="device").transform(mixed)
    assert sum(counts) == 6  # the plain JPEGs; the PNG, the array and the rotated JPEG took the CPU decoder
    assert got.shape == expected.shape == (len(mixed), 1280) and got.dtype == np.float32
    assert_close_scaled(got, expected, TOLERANCE)
    assert np.abs(expected[7] - expected[0]).max() > 10 * TOLERANCE * np.abs(expected).max()  # the tolerance is tight


def test_auto_decodes_on_the_device_only_on_cuda(fitted, mixed, monkeypatch):
    assert resolve_decode("auto", "cuda") == "device" and resolve_decode("auto", torch.device("cpu")) == "cpu"
    assert resolve_decode("auto", "mps") == "cpu" and resolve_decode("device", "cpu") == "device"
    monkeypatch.setattr(torch.version, "hip", "6.2")  # ROCm: torch.device("cuda"), but no nvJPEG
    assert resolve_decode("auto", "cuda") == "cpu"
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(gpu_decode, "decode_jpeg", None)  # a torchvision without its decoders
    assert resolve_decode("auto", "cuda") == "cpu"
    with pytest.raises(ValueError, match="decode='gpu' is not valid"):
        resolve_decode("gpu", "cuda")
    monkeypatch.undo()

    cuda = torch.device("cuda")  # building loaders needs no GPU; iterating them would
    default = featurizer_like(fitted)
    assert default.decode == "auto" and default.backend == "eager"
    assert isinstance(default._inference_loader(mixed, torch.device("cpu")), ImageLoader)
    on_gpu = default._inference_loader(mixed, cuda)
    assert isinstance(on_gpu, DeviceDecodeLoader) and on_gpu.device == cuda
    assert on_gpu.loader.pin_memory  # CPU-decoded pixels reach the GPU by non-blocking copies
    workers_on_gpu = featurizer_like(fitted, decode="cpu")._inference_loader(mixed, cuda)
    assert isinstance(workers_on_gpu, ImageLoader) and workers_on_gpu.pin_memory
    assert not featurizer_like(fitted, decode="device")._inference_loader(mixed, torch.device("cpu")).loader.pin_memory


def test_device_decode_errors_name_the_bad_item(fitted, mixed, tmp_path, monkeypatch):
    counts = device_decoded_count(monkeypatch)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    missing = str(tmp_path / "missing.jpg")
    X = [mixed[0], mixed[1], missing, mixed[3], str(broken), mixed[5]]
    with pytest.raises(ImageLoadError, match=re.escape(f"image 2 ('{missing}'): file not found")):
        featurizer_like(fitted, decode="device").transform(X)
    with pytest.warns(ImageLoadWarning) as caught:
        features = featurizer_like(fitted, decode="device", on_error="nan").transform(X)
    [warning] = caught
    message = str(warning.message)
    assert "2 of 6 images could not be loaded" in message and f"image 2 ('{missing}')" in message
    assert f"image 4 ('{broken}')" in message and sum(counts) > 0
    assert np.isnan(features[[2, 4]]).all() and not np.isnan(features[[0, 1, 3, 5]]).any()
    expected = featurizer_like(fitted, decode="cpu").transform([X[0], X[1], X[3], X[5]])
    assert_close_scaled(features[[0, 1, 3, 5]], expected, TOLERANCE)


def test_invalid_decode_or_backend_fails_at_fit():
    for params, name in [(dict(decode="gpu"), "decode"), (dict(backend="jit"), "backend")]:
        with pytest.raises(InvalidParameterError, match=f"'{name}' parameter"):
            EfficientNetFeaturizer(0, weights=None, **params).fit()


def test_cache_keeps_decoders_apart_only_where_their_pixels_differ(fitted, mixed, tmp_path):
    cached = {decode: featurizer_like(fitted, decode=decode, memory=tmp_path) for decode in ("auto", "cpu", "device")}
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    on_cpu = {decode: f._feature_cache(cpu, None).directory for decode, f in cached.items()}
    assert len(set(on_cpu.values())) == 1  # libjpeg-turbo either way: one set of rows
    on_cuda = {decode: f._feature_cache(cuda, None).directory for decode, f in cached.items()}
    assert on_cuda["auto"] == on_cuda["device"] != on_cuda["cpu"]  # nvJPEG's pixels differ from libjpeg's
    assert on_cuda["cpu"] not in on_cpu.values()
    rows = cached["cpu"].transform(mixed[:3])
    np.testing.assert_array_equal(cached["device"].transform(mixed[:3]), rows)  # read back from the cache
    compiled = featurizer_like(fitted, backend="compile", memory=tmp_path)._feature_cache(cpu, None).directory
    assert compiled not in on_cpu.values()  # compiled kernels round differently: their rows are their own


# -- backend="compile" -----------------------------------------------------------------------------

class StandInCompiler:
    """Replaces ``torch.compile``: records each call and returns a function that runs the original and
    counts its calls, or raises ``error`` when compiling (``when="compile"``) or at the first call."""

    def __init__(self, error=None, when="compile"):
        self.options, self.calls, self.error, self.when = [], 0, error, when

    def __call__(self, function, options=None, **kwargs):
        self.options.append(options)
        if self.error is not None and self.when == "compile":
            raise self.error

        def compiled(x):  # a local function: a pickle carrying it would fail
            if self.error is not None:
                raise self.error
            self.calls += 1
            return function(x)

        return compiled


def test_compile_backend_runs_the_network_and_pooling_through_torch_compile(fitted, mixed, monkeypatch):
    featurizer = featurizer_like(fitted, layers=[3, -1])
    featurizer.fit()
    featurizer.model_.load_state_dict(fitted.model_.state_dict())
    expected = featurizer.transform(mixed)
    compiler = StandInCompiler()
    monkeypatch.setattr(torch, "compile", compiler)
    featurizer.set_params(backend="compile")
    np.testing.assert_array_equal(featurizer.transform(mixed), expected)  # the same function, compiled
    assert_close_scaled(featurizer.transform(mixed[::-1]), expected[::-1], 1e-5)  # other batches: oneDNN rounds
    assert compiler.options == [{"freezing": True}]  # compiled once; no CUDA graphs on the CPU
    assert compiler.calls == 6  # 9 images in batches of 4, twice
    runner = _base._DERIVED[featurizer.model_]["inference"][2]
    assert isinstance(runner, CompiledOrEager) and runner.compiled is not None and not runner.failed
    assert _base.compile_options(torch.device("cuda"), cudagraphs=True) == {"freezing": True, "triton.cudagraphs": True}

    restored = pickle.loads(pickle.dumps(featurizer))  # succeeds: the compiled code (a local function) stays out
    assert set(vars(restored)) == set(vars(featurizer))
    max_pooled = restored.set_params(pooling="max").transform(mixed[:2])
    assert len(compiler.options) == 2  # another model (the unpickled one), other pooling: compiled anew
    assert_close_scaled(max_pooled, featurizer.set_params(backend="eager", pooling="max").transform(mixed[:2]), 1e-5)


@pytest.mark.parametrize("when", ["compile", "first call"])
def test_a_compiler_failure_falls_back_to_eager_with_a_warning(fitted, mixed, monkeypatch, when):
    expected = featurizer_like(fitted).transform(mixed)
    compiler = StandInCompiler(RuntimeError("InvalidCxxCompiler: No working C++ compiler found\ndetails"), when)
    monkeypatch.setattr(torch, "compile", compiler)
    featurizer = featurizer_like(fitted, backend="compile")
    with pytest.warns(RuntimeWarning, match=re.escape(
            "torch.compile failed (RuntimeError: InvalidCxxCompiler: No working C++ compiler found); "
            "running EfficientNetFeaturizer(backend='compile') eagerly")) as caught:
        got = featurizer.transform(mixed)
    assert len([w for w in caught if "torch.compile failed" in str(w.message)]) == 1
    np.testing.assert_array_equal(got, expected)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once; eager from then on, in silence
        np.testing.assert_array_equal(featurizer.transform(mixed), expected)
    assert len(compiler.options) == 1 and compiler.calls == 0
