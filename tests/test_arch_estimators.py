"""The compound-scaled baselines through the one seam (build_model) and the estimators' ``arch=``."""

import numpy as np
import pytest
from synthetic import randomise_batchnorm
import torch
import torchvision.models as tvm
from torchvision.models import get_model_weights

from effsk.weights.checkpoint import CheckpointError, save_checkpoint
from effsk.estimators import EfficientNetClassifier, EfficientNetFeaturizer
from effsk.weights import build_model, imagenet_cache_path


def test_imagenet_weights_of_a_baseline_come_from_torchvisions_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    tv = randomise_batchnorm(tvm.mobilenet_v2()).eval()
    enum = get_model_weights("mobilenet_v2").IMAGENET1K_V1
    path = imagenet_cache_path(enum)
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(tv.state_dict(), path)
    model, prep = build_model(0, "imagenet", arch="mobilenet_v2")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), tv(x), rtol=1e-4, atol=1e-4)
    assert (prep.crop_size, prep.resize_size) == (enum.transforms().crop_size[0], enum.transforms().resize_size[0])
    headless, _ = build_model(0, "imagenet", arch="mobilenet_v2", num_classes=0)
    with torch.no_grad():
        torch.testing.assert_close(headless.eval()(x), tv.classifier[0](tv.features(x).mean((2, 3))))
    with pytest.raises(ValueError, match="only at phi=0"):
        build_model(1, "imagenet", arch="mobilenet_v2")


def test_baseline_checkpoints_round_trip_and_refuse_other_archs(tmp_path):
    model, prep = build_model(0.5, None, arch="mobilenet_v2", num_classes=3)
    path = save_checkpoint(tmp_path / "m.pt", model, prep, classes=["a", "b", "c"])
    again, prep2 = build_model(None, path, num_classes=3)  # phi=None: the checkpoint's own arch and phi
    assert type(again) is type(model) and prep2 == prep
    for key, value in model.state_dict().items():
        assert torch.equal(value, again.state_dict()[key])
    with pytest.raises(CheckpointError, match="holds mobilenet_v2"):
        build_model("b0", path)
    tv_file = tmp_path / "r.pth"
    torch.save(tvm.resnet50().state_dict(), tv_file)
    with pytest.raises(CheckpointError, match="do not fit mobilenet_v2"):
        build_model(0, tv_file, arch="mobilenet_v2")


def test_featurizer_and_classifier_take_arch():
    rng = np.random.default_rng(0)
    X = rng.integers(0, 255, (24, 32, 32, 3), dtype=np.uint8)
    y = np.arange(24) % 2
    X[y == 1, :16] = 255  # a visible class signal
    feat = EfficientNetFeaturizer(0, arch="mobilenet_v2", weights=None, resolution=32).fit(X)
    assert feat.transform(X).shape == (24, 1280)
    clf = EfficientNetClassifier(0, arch="mobilenet_v1", weights=None, resolution=32, max_epochs=1,
                                 early_stopping=False, batch_size=8, random_state=0, freeze="backbone")
    clf.fit(X, y)
    assert type(clf.model_).__name__ == "MobileNetV1" and clf.predict_proba(X).shape == (24, 2)
    # freeze="backbone" through the generic head: BatchNorm statistics keep their initial values,
    # while the (zero-initialised) head has trained.
    bns = [m for m in clf.model_.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(torch.all(m.running_mean == 0) and torch.all(m.running_var == 1) for m in bns)
    assert clf.model_.get_classifier().weight.abs().sum() > 0
    with pytest.raises(ValueError, match="arch"):
        EfficientNetFeaturizer(0, arch="vgg16", weights=None).fit(X)
