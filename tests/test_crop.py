"""Crop policies: each policy's geometry against torchvision.transforms.v2.functional computed here,
the "auto" rule's branches, batched = one at a time, train "none" = eval, the policy in checkpoints
(old ones read as "center"), clear errors, and the estimators' ``crop`` reaching ``preprocessing_``."""

import math

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_sample_image
from sklearn.utils._param_validation import InvalidParameterError
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

import effsk.weights
from effsk import EfficientNetClassifier, EfficientNetFeaturizer, EfficientNetRegressor
from effsk.data.preprocessing import CROP_POLICIES, Preprocessing
from effsk.data.transforms import eval_transform, train_transform
from effsk.nn import efficientnet
from effsk.weights import build_model
from effsk.weights.checkpoint import load_checkpoint, save_checkpoint

CROP, RESIZE = 32, 36
MEAN, STD = (0.5, 0.25, 0.75), (0.5, 0.5, 0.5)
BORDER, INSIDE = (250, 10, 130), (20, 200, 60)  # distinct in every channel
POLICIES = [*CROP_POLICIES, 0.95, 1.0]


def _prep(crop, **kwargs) -> Preprocessing:
    return Preprocessing(CROP, RESIZE, "bilinear", MEAN, STD, crop=crop, **kwargs)


def _framed(height: int, width: int, border: int = 6) -> torch.Tensor:
    """A uint8 (3, H, W) image of colour INSIDE with a ``border``-pixel frame of colour BORDER."""
    image = torch.tensor(BORDER, dtype=torch.uint8)[:, None, None].repeat(1, height, width)
    image[:, border:-border, border:-border] = torch.tensor(INSIDE, dtype=torch.uint8)[:, None, None]
    return image


def _normalised(pixels: torch.Tensor) -> torch.Tensor:
    """The reference's last step: uint8 -> [0, 1] -> (x - mean) / std."""
    return F.normalize(F.to_dtype(pixels, torch.float32, scale=True), list(MEAN), list(STD))


def _colour(values) -> torch.Tensor:
    """A normalised colour as (3, 1, 1), to compare against image rows or columns."""
    return _normalised(torch.tensor(values, dtype=torch.uint8)[:, None, None])


def _is(region: torch.Tensor, values) -> bool:
    colour = _colour(values).view(3, *[1] * (region.dim() - 1))
    return bool(torch.allclose(region, colour.expand_as(region), atol=0.02))


def _resize(image, size):
    return F.resize(image, size, interpolation=InterpolationMode.BILINEAR, antialias=True)


def test_squash_keeps_the_whole_image_and_its_frame_on_every_side():
    image = _framed(40, 80)
    out = eval_transform(_prep("squash"))(image)
    torch.testing.assert_close(out, _normalised(_resize(image, [CROP, CROP])), rtol=0, atol=1e-6)
    for edge in (out[:, 0, 8:-8], out[:, -1, 8:-8], out[:, 8:-8, 0], out[:, 8:-8, -1]):
        assert _is(edge, BORDER)
    assert _is(out[:, 12:20, 12:20], INSIDE)


def test_letterbox_fits_the_whole_image_and_pads_with_the_mean_colour():
    image = _framed(40, 80)
    out = eval_transform(_prep("letterbox"))(image)
    fitted = _resize(image, [16, 32])  # the longer side becomes the crop size, the ratio is kept
    padding = [0, 8, 0, 8]
    expected = _normalised(F.pad(fitted, padding, fill=[round(255 * m) for m in MEAN]))
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    assert out[:, :8].abs().max() < 0.01 and out[:, -8:].abs().max() < 0.01  # zero after normalisation
    for edge in (out[:, 8, 4:-4], out[:, 23, 4:-4], out[:, 10:22, 0], out[:, 10:22, -1]):
        assert _is(edge, BORDER)


def test_center_and_crop_fractions_cut_the_sides():
    image = _framed(40, 80)
    for crop, resize in (("center", RESIZE), (0.95, math.floor(CROP / 0.95)), (1.0, CROP)):
        out = eval_transform(_prep(crop))(image)
        expected = _normalised(F.center_crop(_resize(image, [resize]), [CROP, CROP]))
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-6, msg=f"crop={crop!r}")
        assert _is(out[:, 8:-8, 0], INSIDE) and _is(out[:, 8:-8, -1], INSIDE), crop  # left and right frame cut off
    assert _is(eval_transform(_prep(1.0))(image)[:, 0, 8:-8], BORDER)  # 1.0 keeps the whole shorter side


@pytest.mark.parametrize("size", [(150, 200), (97, 61), (40, 33)])
def test_policies_match_timms_crop_modes_on_a_photo(size):
    """timm's eval transform (PIL resize) is the reference: crop_mode "squash" / "border" (its
    letterbox, padded with the mean colour) at crop_pct 1, and crop_pct for crop fractions."""
    timm_data = pytest.importorskip("timm.data")
    photo = Image.fromarray(load_sample_image("china.jpg")).resize(size, Image.BICUBIC)
    one_level = 1 / 255 / min(STD)
    for crop, crop_mode, crop_pct in (("squash", "squash", 1.0), ("letterbox", "border", 1.0), (0.95, "center", 0.95)):
        reference = timm_data.create_transform(input_size=(3, CROP, CROP), crop_pct=crop_pct, crop_mode=crop_mode,
                                               interpolation="bilinear", mean=MEAN, std=STD)
        ours = eval_transform(_prep(crop))(F.pil_to_tensor(photo))
        torch.testing.assert_close(ours, reference(photo), rtol=0, atol=one_level * 1.01, msg=f"crop={crop!r}")


@pytest.mark.parametrize(
    "shape, branch",
    [((20, 40), "squash"), ((35, 35), "squash"), ((RESIZE, 50), "center"), ((40, 80), "center"), ((90, 60), "center")],
)
def test_auto_squashes_images_the_centre_recipe_would_upscale(shape, branch):
    """"auto": shorter side below resize_size -> the whole image squashed; else the weights' crop."""
    image = _framed(*shape)
    if branch == "squash":
        expected = _normalised(_resize(image, [CROP, CROP]))
    else:
        expected = _normalised(F.center_crop(_resize(image, [RESIZE]), [CROP, CROP]))
    torch.testing.assert_close(eval_transform(_prep("auto"))(image), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("crop", POLICIES)
@pytest.mark.parametrize("shape", [(20, 44), (60, 45)])
def test_batched_equals_one_at_a_time_and_train_none_is_eval(crop, shape):
    images = torch.randint(0, 256, (3, 3, *shape), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    evaluate = eval_transform(_prep(crop))
    one_at_a_time = torch.stack([evaluate(image) for image in images])
    assert one_at_a_time.shape == (3, 3, CROP, CROP)
    torch.testing.assert_close(evaluate(images), one_at_a_time, rtol=0, atol=1e-6)
    torch.testing.assert_close(train_transform(_prep(crop), "none")(images[0]), one_at_a_time[0], rtol=0, atol=0)
    torch.manual_seed(0)  # the augmented views have the crop size whatever the policy
    assert train_transform(_prep(crop), "light")(images[0]).shape == (3, CROP, CROP)


@pytest.mark.parametrize("crop", ["middle", "", 0, 0.0, -0.5, 1.5, True, None, float("nan")])
def test_invalid_crop_values_name_the_value_and_the_choices(crop):
    with pytest.raises(ValueError, match=r"crop=.*use one of .*'center'.*crop fraction in \(0, 1\]"):
        _prep(crop)


@pytest.mark.parametrize("estimator", [EfficientNetFeaturizer, EfficientNetClassifier, EfficientNetRegressor])
def test_estimators_refuse_bad_crop_at_fit(estimator):
    X, y = np.zeros((4, 16, 16, 3), dtype=np.uint8), [0, 1, 0, 1]
    for crop in ("middle", 1.5, 0):
        with pytest.raises(InvalidParameterError, match=r"'crop' parameter"):
            estimator("b0", weights=None, crop=crop).fit(X, y)


def test_old_dicts_read_as_center_and_every_policy_round_trips():
    old = {"crop_size": 32, "resize_size": 36, "interpolation": "bilinear", "mean": [0.5] * 3, "std": [0.5] * 3}
    assert Preprocessing.from_dict(old).crop == "center"
    image = _framed(40, 80)
    expected = F.normalize(F.to_dtype(F.center_crop(_resize(image, [36]), [32, 32]), torch.float32, scale=True),
                           [0.5] * 3, [0.5] * 3)
    torch.testing.assert_close(eval_transform(Preprocessing.from_dict(old))(image), expected, rtol=0, atol=1e-6)
    for crop in POLICIES:
        prep = _prep(crop)
        assert Preprocessing.from_dict(prep.to_dict()) == prep and prep.with_resolution(64).crop == crop
    assert _prep(1).crop == 1.0 and type(_prep(1).crop) is float


def test_checkpoints_carry_the_policy_and_old_checkpoints_load_as_center(tmp_path):
    model = efficientnet("b0", num_classes=2).eval()
    path = save_checkpoint(tmp_path / "new.pt", model, _prep(0.9))
    assert load_checkpoint(path)["preprocessing"]["crop"] == 0.9
    assert build_model(None, path, num_classes=2)[1] == _prep(0.9)

    payload = load_checkpoint(path)  # as effsk wrote it before the policy existed
    del payload["preprocessing"]["crop"]
    torch.save(payload, tmp_path / "old.pt")
    assert build_model(None, tmp_path / "old.pt", num_classes=2)[1] == _prep("center")


def test_featurizer_crop_reaches_preprocessing_features_and_cache_key(tmp_path, monkeypatch):
    real_build = effsk.weights.build_model

    def seeded_build(*args, **kwargs):
        torch.manual_seed(0)
        return real_build(*args, **kwargs)

    monkeypatch.setattr(effsk.weights, "build_model", seeded_build)
    X = np.stack([_framed(20, 40).permute(1, 2, 0).numpy(), _framed(20, 40, border=5).permute(1, 2, 0).numpy()])
    assert EfficientNetFeaturizer("b0", weights=None).crop == "auto"
    features = {}
    for crop in ("letterbox", "center"):
        featurizer = EfficientNetFeaturizer("b0", weights=None, resolution=CROP, crop=crop, precision="fp32", memory=str(tmp_path))
        featurizer.fit()
        assert featurizer.preprocessing_.crop == crop
        features[crop] = featurizer.transform(X)
        # the network on this test's own preprocessing of the images
        prep = featurizer.preprocessing_
        pixels, interpolation = torch.from_numpy(X).permute(0, 3, 1, 2), InterpolationMode(prep.interpolation)
        if crop == "letterbox":
            pixels = F.resize(pixels, [16, 32], interpolation=interpolation, antialias=True)
            pixels = F.pad(pixels, [0, 8, 0, 8], fill=[round(255 * m) for m in prep.mean])
        else:
            pixels = F.resize(pixels, [prep.resize_size], interpolation=interpolation, antialias=True)
            pixels = F.center_crop(pixels, [CROP, CROP])
        inputs = F.normalize(F.to_dtype(pixels, torch.float32, scale=True), list(prep.mean), list(prep.std))
        with torch.no_grad():
            expected = featurizer.model_.forward_features(inputs).mean((2, 3)).numpy()
        np.testing.assert_allclose(features[crop], expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    scale = np.abs(features["center"]).max()
    assert np.abs(features["letterbox"] - features["center"]).max() > 0.05 * scale  # the cache kept them apart


@pytest.mark.parametrize("estimator", [EfficientNetClassifier, EfficientNetRegressor])
def test_fine_tuners_store_the_policy_in_preprocessing(estimator):
    X, y = np.zeros((4, 16, 16, 3), dtype=np.uint8), [0.0, 1.0, 0.0, 1.0]
    fitted = estimator("b0", weights=None, resolution=16, crop="letterbox", max_epochs=1, batch_size=2,
                       early_stopping=False).fit(X, y)
    assert fitted.preprocessing_.crop == "letterbox" and fitted.preprocessing_.crop_size == 16
    assert estimator().crop == "auto"
