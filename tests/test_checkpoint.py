"""effsk checkpoints: self-describing, atomic, weights-only, and the seam's use of them."""

import os
import stat

import numpy as np
import pytest
from synthetic import randomise_batchnorm
import torch
import torchvision.models as tvm

from effsk.weights.checkpoint import FORMAT, FORMAT_VERSION, CheckpointError, load_checkpoint, save_checkpoint
from effsk.nn import efficientnet
from effsk.data.preprocessing import Preprocessing
from effsk.weights import build_model

PREP = Preprocessing(crop_size=64, resize_size=72, interpolation="bilinear")


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def b0_three_classes(tmp_path_factory):
    model = randomise_batchnorm(efficientnet("b0", num_classes=3)).eval()
    path = tmp_path_factory.mktemp("ckpt") / "b0.effsk.pt"
    metadata = {"epochs": np.int64(2), "val_score": np.float32(0.5), "history": [{"loss": 1.0}], "data": "pets"}
    save_checkpoint(path, model, PREP, classes=np.array(["cat", "dog", "eel"]), metadata=metadata)
    return model, path


def test_checkpoint_holds_everything_needed_to_rebuild(b0_three_classes, images):
    model, path = b0_three_classes
    ckpt = load_checkpoint(path)
    assert ckpt["format"] == FORMAT and ckpt["format_version"] == FORMAT_VERSION
    assert ckpt["arch"] == {**model.scaling.as_dict(), "same_padding": False, "num_classes": 3, "in_chans": 3}
    assert Preprocessing.from_dict(ckpt["preprocessing"]) == PREP
    assert ckpt["classes"] == ["cat", "dog", "eel"] and all(type(c) is str for c in ckpt["classes"])
    assert ckpt["metadata"] == {"epochs": 2, "val_score": 0.5, "history": [{"loss": 1.0}], "data": "pets"}
    assert type(ckpt["metadata"]["epochs"]) is int and type(ckpt["metadata"]["val_score"]) is float
    # The state_dict is torchvision's format: torchvision's own model takes it unchanged.
    tv = tvm.efficientnet_b0(num_classes=3).eval()
    tv.load_state_dict(ckpt["state_dict"])
    rebuilt, prep = build_model("b0", path, num_classes=3)
    from_checkpoint_only, _ = build_model(None, path, num_classes=3)
    assert prep == PREP
    with torch.no_grad():
        expected = model(images)
        assert torch.allclose(tv(images), expected, atol=1e-5)
        assert torch.equal(rebuilt.eval()(images), expected)
        assert torch.equal(from_checkpoint_only.eval()(images), expected)


def test_transfer_from_checkpoint_skips_or_replaces_the_head(b0_three_classes, images):
    model, path = b0_three_classes
    headless, _ = build_model("b0", path, num_classes=0)
    five, _ = build_model("b0", path, num_classes=5)
    with torch.no_grad():
        pooled = model.forward_head(model.forward_features(images), pre_logits=True)
        assert torch.equal(headless.eval()(images), pooled)
        assert torch.equal(five.eval().forward_head(five.forward_features(images), pre_logits=True), pooled)
    assert five.classifier[1].out_features == 5


def test_checkpoint_architecture_rebuilds_model_and_is_checked_against_phi(tmp_path, images):
    model = randomise_batchnorm(efficientnet(0.5, scaling="compound", same_padding=True, num_classes=4)).eval()
    path = tmp_path / "compound.pt"
    save_checkpoint(path, model, PREP)
    rebuilt, _ = build_model(0.5, path, scaling="compound", num_classes=4)
    assert rebuilt.same_padding and rebuilt.scaling == model.scaling
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(images), model(images))
    with pytest.raises(CheckpointError) as info:
        build_model(0.5, path)  # official phi=0.5 has another width and depth
    message = str(info.value)
    assert str(path) in message and "phi=0.5 requests" in message
    assert f"width {model.scaling.width:.4g}" in message and "width 1," in message


def test_save_is_atomic_and_keeps_the_previous_file_on_failure(tmp_path, monkeypatch):
    model = efficientnet("b0", num_classes=2)
    path = tmp_path / "model.pt"
    save_checkpoint(path, model, PREP, metadata={"version": "old"})

    def crash(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError("disk full (test)")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, model, PREP, metadata={"version": "new"})
    monkeypatch.undo()
    assert load_checkpoint(path)["metadata"] == {"version": "old"}
    assert os.listdir(tmp_path) == ["model.pt"]  # no temp file left behind


def test_saved_file_permissions_follow_umask(tmp_path):
    path = save_checkpoint(tmp_path / "sub" / "m.pt", efficientnet("b0", num_classes=0), PREP)
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask


def test_format_is_extensible_but_versioned(tmp_path):
    model = efficientnet("b0", num_classes=0)
    path = save_checkpoint(tmp_path / "m.pt", model, PREP, extra={"training": {"epoch": 3, "ema": torch.ones(2)}})
    ckpt = load_checkpoint(path)
    assert ckpt["training"]["epoch"] == 3 and torch.equal(ckpt["training"]["ema"], torch.ones(2))
    with pytest.raises(ValueError, match="'arch' would overwrite"):
        save_checkpoint(tmp_path / "x.pt", model, PREP, extra={"arch": {}})

    newer = {**ckpt, "format_version": FORMAT_VERSION + 1}
    torch.save(newer, tmp_path / "newer.pt")
    with pytest.raises(CheckpointError, match=f"format version {FORMAT_VERSION + 1}, newer .* upgrade effsk"):
        load_checkpoint(tmp_path / "newer.pt")
    broken = {**ckpt, "arch": {k: v for k, v in ckpt["arch"].items() if k != "width"}}
    torch.save(broken, tmp_path / "broken.pt")
    with pytest.raises(CheckpointError, match=r"arch config lacks \['width'\]"):
        build_model("b0", tmp_path / "broken.pt")
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="is not an effsk checkpoint: found a dict with"):
        load_checkpoint(tmp_path / "plain.pt")


def test_only_plain_values_are_stored(tmp_path):
    model = efficientnet("b0", num_classes=2)
    with pytest.raises(TypeError, match=r"metadata\['optimizer'\] is a SGD"):
        save_checkpoint(tmp_path / "m.pt", model, PREP, metadata={"optimizer": torch.optim.SGD(model.parameters())})
    with pytest.raises(ValueError, match="3 class labels for a model with 2 outputs"):
        save_checkpoint(tmp_path / "m.pt", model, PREP, classes=["a", "b", "c"])
    assert os.listdir(tmp_path) == []  # rejected before anything is written
    path = save_checkpoint(tmp_path / "m.pt", model, PREP, classes=[1, "b"])
    assert load_checkpoint(path)["classes"] == [1, "b"]  # mixed labels keep their types
