"""weights="imagenet" (torchvision's files, offline-first), plain state_dict paths, and clear failures.

Reference models are torchvision's, built here; nothing touches the network: the download function is
replaced by one that fails, or fed a local ``file://`` URL to exercise torch.hub's real hash check.
"""

import hashlib
import os
import pathlib
import pickle
import types

import pytest
import torch
import torchvision.models as tvm
from torch import nn
from torchvision.models import EfficientNet_B0_Weights, EfficientNet_B1_Weights, get_model_weights

from effsk.weights.checkpoint import CheckpointError
from effsk.data.preprocessing import Preprocessing
from effsk.weights import WeightsNotFoundError, build_model, imagenet_weights_file, imagenet_weights_status
from effsk.weights.registry import get_weights, list_weights, variant_preprocessing
from effsk.weights.timm_layout import convert_timm_state_dict
from effsk.nn import efficientnet
from effsk.scaling import resolve
from synthetic import randomise_batchnorm

REAL_DOWNLOAD = torch.hub.download_url_to_file  # before the autouse fixture replaces it
B0 = EfficientNet_B0_Weights.IMAGENET1K_V1
B0_FILE = B0.url.rsplit("/", 1)[1]


def _refuse_download(url, dst, hash_prefix=None, progress=True):
    raise OSError(f"network is unreachable (test): {url}")


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    """A private, empty torch hub cache and no network for every test here."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", _refuse_download)
    return tmp_path / "torch_home" / "hub" / "checkpoints"


def _randomised_torchvision_b0(seed=0, **kwargs):
    """torchvision's b0 with non-trivial BN statistics, so that parity checks can fail."""
    g = torch.Generator().manual_seed(seed)
    model = tvm.efficientnet_b0(**kwargs).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model


@pytest.fixture(scope="module")
def tv_b0():
    return _randomised_torchvision_b0()


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_imagenet_b0_is_read_from_the_hub_cache_offline(offline, tv_b0, images):
    offline.mkdir(parents=True)
    torch.save(tv_b0.state_dict(), offline / B0_FILE)  # exactly where torch.hub would put the download
    assert imagenet_weights_status("b0") == "cached"
    model, prep = build_model("b0", "imagenet")
    with torch.no_grad():
        assert torch.allclose(model.eval()(images), tv_b0(images), atol=1e-5)
    assert prep == Preprocessing.from_torchvision(B0)
    assert (prep.resize_size, prep.crop_size, prep.interpolation) == (256, 224, "bicubic")  # REFERENCE.md


def test_offline_error_names_file_directory_url_and_local_path_option(offline):
    with pytest.raises(WeightsNotFoundError) as info:
        build_model("b0", "imagenet")
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    for expected in (B0_FILE, str(offline), B0.url, "network is unreachable", f"weights='/path/to/{B0_FILE}'",
                     "TORCH_HOME"):
        assert expected in message
    assert not any(offline.iterdir())  # no partial file left to be trusted later


def _local_release(tmp_path, state_dict, prefix=None):
    """A weights file published under a file:// URL whose name carries a sha256 prefix (torch.hub style)."""
    blob = tmp_path / "blob.pth"
    torch.save(state_dict, blob)
    digest = hashlib.sha256(blob.read_bytes()).hexdigest()
    release = tmp_path / "release" / f"efficientnet_b0_local-{prefix or digest[:8]}.pth"
    release.parent.mkdir()
    blob.rename(release)
    return types.SimpleNamespace(url=release.as_uri()), digest


def test_download_is_hash_checked_then_cached(offline, tmp_path, monkeypatch, tv_b0):
    calls = []
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: calls.append(a) or REAL_DOWNLOAD(*a, **k))
    weights, digest = _local_release(tmp_path, tv_b0.state_dict())
    path = imagenet_weights_file(weights, progress=False)
    assert calls[0][2] == digest[:8]  # the hash prefix parsed from the file name was enforced
    assert hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest() == digest
    assert os.path.dirname(path) == str(offline)
    assert imagenet_weights_file(weights, progress=False) == path and len(calls) == 1  # cached: no second fetch


def test_download_with_wrong_hash_is_refused_and_not_cached(offline, tmp_path, monkeypatch, tv_b0):
    monkeypatch.setattr(torch.hub, "download_url_to_file", REAL_DOWNLOAD)
    weights, digest = _local_release(tmp_path, tv_b0.state_dict(), prefix="deadbeef")
    assert not digest.startswith("deadbeef")
    with pytest.raises(WeightsNotFoundError, match="invalid hash value"):
        imagenet_weights_file(weights, progress=False)
    assert not offline.exists() or not any(offline.iterdir())


def test_torchvision_state_dict_path_loads_full_headless_and_new_head(tmp_path, tv_b0, images):
    path = tmp_path / "b0_state_dict.pth"
    torch.save(tv_b0.state_dict(), path)
    full, prep = build_model("b0", str(path))
    assert prep == Preprocessing.from_torchvision(B0)
    headless, _ = build_model("b0", path, num_classes=0)
    transfer, _ = build_model("b0", path, num_classes=7)
    with torch.no_grad():
        pooled = torch.flatten(tv_b0.avgpool(tv_b0.features(images)), 1)
        assert torch.allclose(full.eval()(images), tv_b0(images), atol=1e-5)
        assert torch.allclose(headless.eval()(images), pooled, atol=1e-5)
        assert torch.allclose(transfer.eval().forward_head(transfer.forward_features(images), pre_logits=True),
                              pooled, atol=1e-5)
    assert transfer.classifier[1].weight.shape == (7, 1280)


def test_ddp_prefixed_state_dict_loads(tmp_path, tv_b0, images):
    path = tmp_path / "ddp.pth"
    torch.save({f"module.{k}": v for k, v in tv_b0.state_dict().items()}, path)
    model, _ = build_model("b0", path)
    with torch.no_grad():
        assert torch.allclose(model.eval()(images), tv_b0(images), atol=1e-5)


def test_backbone_of_another_variant_is_a_clear_error(tmp_path):
    path = tmp_path / "b1.pth"
    torch.save(tvm.efficientnet_b1().state_dict(), path)
    with pytest.raises(CheckpointError) as info:
        build_model("b0", path)
    message = str(info.value)
    assert str(path) in message and "'b0'" in message and "EfficientNet 'b1' backbone" in message
    assert "16 blocks" in message and "23 blocks" in message  # REFERENCE.md block counts, expected vs found


def test_width_mismatch_names_the_first_differing_tensor(tmp_path):
    path = tmp_path / "b2.pth"
    torch.save(tvm.efficientnet_b2().state_dict(), path)
    with pytest.raises(CheckpointError, match=r"features\.0\.0\.weight has shape \(32, 3, 3, 3\) in the file"):
        build_model("b3", path)  # b3 stem is 40 channels, b2's 32


@pytest.mark.parametrize(
    "phi, kwargs, named",
    [(0.5, {}, "phi=0.5"), ("lite3", {}, "'lite3'"), (1, {"scaling": "compound"}, "phi=1")],
)
def test_imagenet_without_published_weights_is_a_clear_error(phi, kwargs, named):
    with pytest.raises(ValueError) as info:
        build_model(phi, "imagenet", **kwargs)
    message = str(info.value)
    assert named in message and "b0..b7" in message and "lite0, lite1, lite2" in message


def test_unknown_weights_name_and_missing_path():
    with pytest.raises(ValueError, match="weights='imagenet21k' is not a known weights name.*'imagenet'"):
        build_model("b0", "imagenet21k")
    with pytest.raises(FileNotFoundError, match="no/such/file.pth"):
        build_model("b0", "no/such/file.pth")
    with pytest.raises(TypeError, match="weights must be None, 'imagenet' or a path"):
        build_model("b0", 3)


def _damaged_files(tmp_path):
    ok = tmp_path / "ok.pth"
    torch.save(tvm.efficientnet_b0().state_dict(), ok)
    data = ok.read_bytes()
    files = {
        "truncated": (data[: len(data) // 2], "truncated, corrupt or not a torch.save file"),
        "empty": (b"", "is empty (0 bytes)"),
        "text": (b"this is not a checkpoint\n", "truncated, corrupt or not a torch.save file"),
    }
    for name, obj, reason in [
        ("tensor", torch.zeros(3), "found a single tensor of shape (3,)"),
        ("list", [1, 2], "found a list"),
        ("training", {"model": {"w": torch.zeros(1)}, "epoch": 3}, "save that entry alone: torch.save(obj['model']"),
    ]:
        path = tmp_path / f"{name}.pth"
        torch.save(obj, path)
        files[name] = (path.read_bytes(), reason)
    return files


def test_damaged_or_foreign_files_are_clear_errors(tmp_path):
    for name, (content, reason) in _damaged_files(tmp_path).items():
        path = tmp_path / f"bad_{name}.pth"
        path.write_bytes(content)
        with pytest.raises(CheckpointError) as info:
            build_model("b0", path)
        assert str(path) in str(info.value) and reason in str(info.value), name


class _Payload:
    """Unpickling this calls ``Path.touch(marker)``: proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, offline, monkeypatch):
    marker = tmp_path / "code_ran"
    via_torch = tmp_path / "evil_torch.pth"
    torch.save({"features.0.0.weight": torch.zeros(1), "x": _Payload(marker)}, via_torch)
    via_pickle = tmp_path / "evil_pickle.pth"
    via_pickle.write_bytes(pickle.dumps({"x": _Payload(marker)}))
    offline.mkdir(parents=True)
    (offline / B0_FILE).write_bytes(via_torch.read_bytes())  # poisoned cache entry

    for attempt in (lambda: build_model("b0", via_torch), lambda: build_model("b0", via_pickle),
                    lambda: build_model("b0", "imagenet")):
        with pytest.raises(CheckpointError, match="refused: it contains pickled Python objects.*nothing in the file"):
            attempt()
    assert not marker.exists()
    pickle.loads(via_pickle.read_bytes())  # control: an unsafe loader does run the payload
    assert marker.exists()


# -- the registry -----------------------------------------------------------------------------------

# REFERENCE.md: torchvision params and GFLOPs (at its eval crop) and the paper's top-1 of b0..b7.
REF_PARAMS = [5_288_548, 7_794_184, 9_109_994, 12_233_232, 19_341_616, 30_389_784, 43_040_704, 66_347_960]
REF_GFLOPS = [0.386, 0.687, 1.088, 1.827, 4.394, 10.266, 19.068, 37.746]
PAPER_TOP1 = [77.1, 79.1, 80.1, 81.6, 82.9, 83.6, 84.0, 84.3]
REF_EVAL = {"b0": (256, 224), "b1": (256, 240), "b2": (288, 288), "b3": (320, 300), "b4": (384, 380),
            "b5": (456, 456), "b6": (528, 528), "b7": (600, 600)}  # REFERENCE.md (resize, crop), bicubic


@pytest.mark.parametrize("k", range(8))
def test_registry_imagenet_entries_are_torchvisions_weights_with_reference_facts(k):
    entry = get_weights(f"b{k}", "imagenet")
    enum = get_model_weights(f"efficientnet_b{k}").IMAGENET1K_V1
    assert entry.source.url == enum.url and entry.preprocessing == Preprocessing.from_torchvision(enum)
    resize, crop = REF_EVAL[f"b{k}"]
    assert (entry.preprocessing.resize_size, entry.preprocessing.crop_size, entry.preprocessing.interpolation) == (
        resize, crop, "bicubic")
    assert (entry.meta.params, entry.meta.gflops, entry.meta.paper_top1) == (REF_PARAMS[k], REF_GFLOPS[k], PAPER_TOP1[k])
    assert not entry.same_padding and entry.bn_eps is None
    assert variant_preprocessing(f"b{k}") == entry.preprocessing  # random init and plain files: the same recipe


def test_registry_lists_every_torchvision_weights_name_and_reads_any_spelling(offline):
    assert [e.name for e in list_weights("b1")] == ["imagenet", "imagenet_v2", "tf_imagenet", "advprop", "noisy_student"]
    v2 = get_weights("b1", "ImageNet-V2")
    assert v2.source.url == EfficientNet_B1_Weights.IMAGENET1K_V2.url
    assert v2.preprocessing.interpolation == "bilinear"  # V2's own recipe, not V1's
    with pytest.raises(ValueError, match="'imagenet_v2'.*exist for b1"):
        get_weights("b0", "imagenet_v2")
    with pytest.raises(ValueError, match="'imagenet21k' is not a registered weights name"):
        get_weights("b0", "imagenet21k")
    with pytest.raises(WeightsNotFoundError, match="Weights 'imagenet_v2' of 'b1' are not on this machine"):
        build_model("b1", " IMAGENET_v2 ")


def test_imagenet_weights_load_under_any_spelling(offline, tv_b0, images):
    offline.mkdir(parents=True)
    torch.save(tv_b0.state_dict(), offline / B0_FILE)
    model, prep = build_model("b0", " ImageNet ")
    with torch.no_grad():
        assert torch.allclose(model.eval()(images), tv_b0(images), atol=1e-5)
    assert model.head_from_weights and prep == Preprocessing.from_torchvision(B0)


def test_build_model_reports_whether_the_head_came_from_the_weights(tmp_path, tv_b0):
    path = tmp_path / "b0.pth"
    torch.save(tv_b0.state_dict(), path)
    assert build_model("b0", path)[0].head_from_weights
    fresh = [build_model("b0", path, num_classes=7)[0], build_model("b0", None)[0], build_model("b0", path, num_classes=0)[0]]
    assert [m.head_from_weights for m in fresh] == [False, False, False]


# -- the paper's TF weights, AdvProp and Noisy Student, as timm publishes them -----------------------

@pytest.mark.parametrize("name, tag", [("tf_imagenet", "aa_in1k"), ("advprop", "ap_in1k"),
                                       ("noisy_student", "ns_jft_in1k")])
def test_timm_tf_weights_in_the_hub_cache_reproduce_timm(offline, name, tag):
    timm = pytest.importorskip("timm")
    safetensors = pytest.importorskip("safetensors.torch")
    reference = randomise_batchnorm(timm.create_model("tf_efficientnet_b0", pretrained=False)).eval()
    offline.mkdir(parents=True)  # exactly where the download would put the Hub's model.safetensors
    safetensors.save_file(reference.state_dict(), offline / f"tf_efficientnet_b0.{tag}.safetensors")
    model, prep = build_model("b0", name)
    x = torch.randn(2, 3, 67, 61, generator=torch.Generator().manual_seed(0))  # odd sizes: asymmetric TF padding
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), reference(x), rtol=1e-5, atol=1e-5)  # TF eps off: 3e-4
    assert model.same_padding and model.head_from_weights
    assert {m.eps for m in model.modules() if isinstance(m, nn.BatchNorm2d)} == {1e-3}  # TF's, not torchvision's
    cfg = timm.models.get_pretrained_cfg(f"tf_efficientnet_b0.{tag}")
    assert (prep.crop_size, prep.interpolation) == (cfg.input_size[-1], cfg.interpolation)
    assert prep.mean == pytest.approx(cfg.mean) and prep.std == pytest.approx(cfg.std)
    assert prep.crop_size / prep.resize_size == pytest.approx(cfg.crop_pct, abs=2e-3)  # TF: crop of size + 32


def test_timm_layout_converts_lite_and_refuses_blocks_a_variant_lacks():
    timm = pytest.importorskip("timm")
    state_dict = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    assert convert_timm_state_dict(state_dict, resolve("lite0")).keys() == efficientnet("lite0").state_dict().keys()
    b1 = timm.create_model("tf_efficientnet_b1", pretrained=False).state_dict()
    with pytest.raises(ValueError, match=r"blocks\.0\.1\.conv_dw\.weight': block 0\.1 does not exist in b0"):
        convert_timm_state_dict(b1, resolve("b0"))


def test_damaged_safetensors_file_in_the_cache_is_a_clear_error(offline):
    pytest.importorskip("safetensors.torch")
    offline.mkdir(parents=True)
    (offline / "tf_efficientnet_b0.ns_jft_in1k.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="tf_efficientnet_b0.ns_jft_in1k.safetensors.*cannot be read as safetensors"):
        build_model("b0", "Noisy-Student")


def test_hub_safetensors_download_is_size_checked_then_cached(offline, tmp_path, monkeypatch):
    safetensors = pytest.importorskip("safetensors.torch")
    from effsk.weights.sources import Download

    monkeypatch.setattr(torch.hub, "download_url_to_file", REAL_DOWNLOAD)
    tensors = {"a": torch.arange(1000, dtype=torch.float32), "b": torch.ones(3, 5)}
    whole = tmp_path / "hub" / "model.safetensors"
    whole.parent.mkdir()
    safetensors.save_file(tensors, whole)
    cut = whole.with_name("cut.safetensors")
    cut.write_bytes(whole.read_bytes()[:-100])  # a transfer that stopped early

    source = Download(cut.as_uri(), filename="tf_efficientnet_b0.ns_jft_in1k.safetensors")
    with pytest.raises(WeightsNotFoundError, match=r"has \d+ bytes but its safetensors header describes \d+: a truncated"):
        source.fetch(progress=False)
    assert not offline.exists() or not any(offline.iterdir())  # nothing half-written in the cache

    path = Download(whole.as_uri(), filename="tf_efficientnet_b0.ns_jft_in1k.safetensors").fetch(progress=False)
    assert os.path.dirname(path) == str(offline) and sorted(os.listdir(offline)) == [os.path.basename(path)]
    loaded = safetensors.load_file(path)
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())

    from effsk.weights.sources import check_safetensors_size

    odd = tmp_path / "odd.safetensors"
    odd.write_bytes((2).to_bytes(8, "little") + b"[]")  # JSON, but not a safetensors header
    with pytest.raises(ValueError, match="odd.safetensors is not a readable safetensors file .*JSON list"):
        check_safetensors_size(str(odd))
