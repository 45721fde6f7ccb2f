"""effsk.data.images: every input type decodes to the same pixels, bad input names the item, loaders stream.

References are independent of effsk: the source pixel arrays themselves, PIL's own conversions of the
same files, and torchvision's ImageClassification eval transform.
"""

import io
import os
import pickle

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image, ImageOps
from sklearn.datasets import load_sample_image
from torchvision.models import EfficientNet_B0_Weights
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from effsk.data.images import ImageLoadError, load_image, make_loader, num_images
from effsk.data.transforms import eval_transform
from effsk.data.preprocessing import IMAGENET_STD, Preprocessing

H, W = 20, 30
TINY = Preprocessing(crop_size=16, resize_size=18)


@pytest.fixture(scope="module")
def pixels():
    return np.random.default_rng(0).integers(0, 256, size=(H, W, 3), dtype=np.uint8)


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def _chw(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(array)).permute(2, 0, 1)


def _object_array(items) -> np.ndarray:
    array = np.empty(len(items), dtype=object)
    for i, item in enumerate(items):
        array[i] = item
    return array


def _decode_all(X):
    """Decode X through the loader (the path every estimator uses) with an identity transform."""
    loader = make_loader(X, TINY, transform=lambda image: image, batch_size=1)
    return [images[0] for images, _ in loader]


def test_every_input_type_decodes_to_the_same_pixels(pixels, tmp_path):
    path = tmp_path / "img.png"
    Image.fromarray(pixels).save(path)
    png = path.read_bytes()
    expected = _chw(pixels)
    items = [
        str(path),
        path,  # PathLike
        png,
        bytearray(png),
        Image.fromarray(pixels),
        pixels,
        pixels.astype(np.float32) / 255,  # float pixels in [0, 1]
        pixels.astype(np.uint16) * 257,  # 16-bit
        pixels.astype(np.int64),
        torch.from_numpy(pixels).permute(2, 0, 1),  # CHW tensor
        torch.from_numpy(pixels).permute(2, 0, 1).float() / 255,
        pixels[::-1][::-1],  # a negatively strided view
    ]
    for i, image in enumerate(_decode_all(items)):
        assert image.dtype == torch.uint8 and image.shape == (3, H, W), i
        assert torch.equal(image, expected), f"item {i} ({type(items[i]).__name__})"

    containers = {
        "list": items[:6],
        "object array": _object_array(items[:6]),
        "str array": np.array([str(path)] * 3),
        "Series": pd.Series([str(path)] * 3, index=[7, 8, 9]),
        "DataFrame": pd.DataFrame({"image": [png] * 3}),
        "NHWC uint8": np.stack([pixels] * 3),
        "NCHW tensor": torch.from_numpy(np.stack([pixels] * 3)).permute(0, 3, 1, 2),
    }
    for name, X in containers.items():
        decoded = _decode_all(X)
        assert len(decoded) == num_images(X), name
        assert all(torch.equal(image, expected) for image in decoded), name


def test_grayscale_inputs_become_three_equal_channels(pixels):
    gray = pixels[..., 0]
    expected = torch.from_numpy(gray).expand(3, -1, -1)
    X = [gray, gray[..., None], np.stack([gray] * 2), torch.from_numpy(gray), _encode(Image.fromarray(gray), "PNG")]
    decoded = _decode_all(X[:2]) + _decode_all(X[2]) + _decode_all(X[3:])
    assert len(decoded) == 6
    assert all(torch.equal(image, expected) for image in decoded)


@pytest.mark.parametrize(
    "mode, fmt",
    [("L", "PNG"), ("LA", "PNG"), ("RGBA", "PNG"), ("P", "PNG"), ("CMYK", "JPEG"), ("L", "JPEG"),
     ("RGB", "BMP"), ("RGB", "TIFF"), ("P", "GIF"), ("RGBA", "WEBP"), ("CMYK", "TIFF")],
)
def test_modes_and_formats_convert_to_rgb_like_pil(pixels, mode, fmt):
    source = Image.fromarray(pixels).convert(mode)
    if mode == "P" and fmt == "PNG":
        source.info["transparency"] = 0
    data = _encode(source, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    with Image.open(io.BytesIO(data)) as reference:
        expected = _chw(np.asarray(reference.convert("RGB")))
    (image,) = _decode_all([data])
    assert torch.equal(image, expected)


def test_sixteen_bit_png_keeps_the_high_byte():
    values = np.random.default_rng(1).integers(0, 65536, size=(H, W), dtype=np.uint16)
    data = _encode(Image.fromarray(values), "PNG")
    expected = torch.from_numpy((values >> 8).astype(np.uint8)).expand(3, -1, -1)
    decoded = _decode_all([data, Image.open(io.BytesIO(data)), _encode(Image.fromarray(values), "TIFF")])
    assert all(torch.equal(image, expected) for image in decoded)  # torchvision, then PIL's I;16 twice


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_exif_orientation_is_applied(pixels, fmt):
    source = Image.fromarray(pixels)
    exif = source.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    data = _encode(source, fmt, exif=exif.tobytes())
    with Image.open(io.BytesIO(data)) as stored:
        upright = np.asarray(ImageOps.exif_transpose(stored).convert("RGB"))
        tagged = stored.copy()
    if fmt == "PNG":  # lossless: the reference is the source rotated
        np.testing.assert_array_equal(upright, np.rot90(pixels, k=-1))
    expected = _chw(upright)
    decoded = _decode_all([data, tagged])
    assert expected.shape == (3, W, H)
    assert all(torch.equal(image, expected) for image in decoded)


def test_eval_transform_matches_torchvision_image_classification():
    """torchvision's published accuracies come from ImageClassification on PIL images (PIL's resize);
    transforms.v2's uint8 kernels reproduce it to within one grey level before normalisation."""
    weights = EfficientNet_B0_Weights.IMAGENET1K_V1
    reference = weights.transforms()
    photo = Image.fromarray(load_sample_image("china.jpg")).reduce(2)  # 320x214, a natural image
    image = F.pil_to_tensor(photo)
    one_level = 1 / 255 / min(IMAGENET_STD)

    ours = eval_transform(Preprocessing.from_torchvision(weights))(image)
    expected = reference(photo)
    assert ours.dtype == torch.float32 and ours.shape == expected.shape == (3, 224, 224)
    torch.testing.assert_close(ours, expected, rtol=0, atol=one_level * 1.01)
    assert (ours - expected).abs().mean() < one_level / 20

    # Another recipe (bilinear, other statistics), from the same torchvision preset class.
    other = type(reference)(
        crop_size=40, resize_size=48, interpolation=InterpolationMode.BILINEAR,
        mean=(0.5, 0.4, 0.3), std=(0.3, 0.3, 0.4),
    )
    ours = eval_transform(Preprocessing(40, 48, "bilinear", (0.5, 0.4, 0.3), (0.3, 0.3, 0.4)))(image)
    torch.testing.assert_close(ours, other(photo), rtol=0, atol=1.01 / 255 / 0.3)


def _truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


@pytest.fixture
def bad_files(tmp_path, pixels):
    jpeg = _encode(Image.fromarray(pixels), "JPEG")
    png = _encode(Image.fromarray(pixels), "PNG")
    files = {
        "empty": b"",
        "truncated_jpeg": _truncated(jpeg),
        "truncated_png": _truncated(png),
        "not_an_image": b"just some text, not pixels",
    }
    paths = {}
    for name, data in files.items():
        paths[name] = tmp_path / f"{name}.jpg"
        paths[name].write_bytes(data)
    paths["missing"] = tmp_path / "missing.jpg"
    paths["directory"] = tmp_path / "a_directory.jpg"
    paths["directory"].mkdir()
    return paths


@pytest.mark.parametrize(
    "name, reason",
    [
        ("missing", "file not found"),
        ("empty", "file is empty"),
        ("truncated_jpeg", "truncated"),
        ("truncated_png", "truncated"),
        ("not_an_image", "not an image"),
        ("directory", "is a directory"),
    ],
)
def test_bad_files_name_index_path_and_reason(bad_files, pixels, name, reason):
    X = [pixels, pixels, bad_files[name], pixels]
    with pytest.raises(ImageLoadError, match=reason) as info:
        list(make_loader(X, TINY, batch_size=2))
    error = info.value
    assert error.index == 2 and error.path == str(bad_files[name])
    assert str(error).startswith(f"image 2 ({str(bad_files[name])!r}): ")
    restored = pickle.loads(pickle.dumps(error))  # e.g. back from a joblib worker
    assert (restored.index, restored.path, restored.reason) == (error.index, error.path, error.reason)


def test_decompression_bomb_is_refused(pixels, monkeypatch, tmp_path):
    path = tmp_path / "bomb.png"
    Image.fromarray(pixels).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", H * W - 1)
    for item in (path, path.read_bytes(), Image.fromarray(pixels)):
        with pytest.raises(ImageLoadError, match=r"image 5.*decompression bomb: 30x20 = 600 pixels"):
            load_image(item, index=5)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", H * W)
    assert load_image(path).shape == (3, H, W)


@pytest.mark.parametrize(
    "item, reason",
    [
        (np.full((4, 4, 3), np.nan, dtype=np.float32), "contains NaN"),
        (np.full((4, 4, 3), np.inf), "infinite"),
        (np.full((4, 4, 3), 2.0), r"must lie in \[0, 1\]"),
        (np.full((4, 4, 3), 300), r"must lie in \[0, 255\]"),
        (np.zeros(16, dtype=np.uint8), "not an image: expected"),
        (np.zeros((2, 4, 4, 3), dtype=np.uint8), "not an image: expected"),
        (np.zeros((4, 4, 2), dtype=np.uint8), "has 2 channels"),
        (torch.zeros(5, 4, 4), "has 5 channels"),
        (np.zeros((0, 4, 3), dtype=np.uint8), "no pixels"),
        (np.array([["a"]]), "dtype <U1 is not an image"),
        (None, "missing value"),
        (3.5, "unsupported item of type float"),
    ],
)
def test_bad_arrays_name_index_and_reason(item, reason):
    with pytest.raises(ImageLoadError, match=rf"^image 1: .*{reason}"):
        list(make_loader([np.zeros((4, 4), dtype=np.uint8), item], TINY))


@pytest.mark.parametrize(
    "X, error, message",
    [
        ([], ValueError, "X is empty"),
        (np.zeros((0, 8, 8, 3), dtype=np.uint8), ValueError, "X is empty"),
        (pd.Series([], dtype=object), ValueError, "X is empty"),
        ("photo.jpg", TypeError, "single str"),
        (Image.new("RGB", (4, 4)), TypeError, "single Image"),
        ({"a": 1}, TypeError, "dict is not supported"),
        (pd.DataFrame({"a": ["x.jpg"], "b": [1.0]}), ValueError, r"2 columns \['a', 'b'\]"),
        (np.zeros((5, 3)), ValueError, "2-D numeric array"),
        (np.zeros((2, 8, 8, 5)), ValueError, "C in 1, 3, 4"),
        (torch.zeros(2, 8, 8, 3), ValueError, r"must be \(N, C, H, W\)"),
        (np.array([b"abc"]), TypeError, "fixed-width bytes"),
    ],
)
def test_bad_containers_are_refused_clearly(X, error, message):
    with pytest.raises(error, match=message):
        num_images(X)
    with pytest.raises(error, match=message):
        make_loader(X, TINY)


def test_loader_targets_indices_shuffle_and_custom_transform(pixels):
    X = [pixels] * 5
    targets = np.array([[0.0, 1.0], [1.0, 2.0], [2.0, 3.0], [3.0, 4.0], [4.0, 5.0]])
    batches = list(make_loader(X, TINY, targets=targets, batch_size=2))
    assert [tuple(images.shape) for images, _ in batches] == [(2, 3, 16, 16)] * 2 + [(1, 3, 16, 16)]
    assert torch.equal(torch.cat([t for _, t in batches]), torch.from_numpy(targets))
    assert batches[0][0].dtype == torch.float32

    def order(seed, **kwargs):
        generator = torch.Generator().manual_seed(seed)
        loader = make_loader(X, TINY, batch_size=2, shuffle=True, generator=generator, **kwargs)
        return torch.cat([t for _, t in loader]).tolist()

    assert sorted(order(0)) == [0, 1, 2, 3, 4] and order(0) == order(0)
    assert len(order(0, drop_last=True)) == 4
    from_series = make_loader(X, TINY, targets=pd.Series([5, 6, 7, 8, 9]))
    assert torch.equal(torch.cat([t for _, t in from_series]), torch.arange(5, 10))
    with pytest.raises(ValueError, match="targets has 4 rows but X has 5 images"):
        make_loader(X, TINY, targets=[1, 2, 3, 4])

    seen = []
    (images, _), = make_loader(X[:1], TINY, transform=lambda image: seen.append(image) or image[:, :8, :8].float())
    assert seen[0].dtype == torch.uint8 and seen[0].shape == (3, H, W)
    assert images.shape == (1, 3, 8, 8)


def test_loader_on_error_nan_keeps_rows_and_reports_failures(pixels, tmp_path):
    missing = str(tmp_path / "gone.png")
    X = [pixels, missing, pixels]
    loader = make_loader(X, TINY, batch_size=3, on_error="nan", return_errors=True)
    ((images, indices, errors),) = list(loader)
    assert indices.tolist() == [0, 1, 2]
    assert errors == [(1, missing, "file not found")]
    assert torch.isnan(images[1]).all() and not torch.isnan(images[[0, 2]]).any()
    ((images2, _),) = list(make_loader(X, TINY, batch_size=3, on_error="nan"))
    torch.testing.assert_close(images2, images, equal_nan=True)


def test_decoding_streams_one_batch_at_a_time(pixels):
    decoded = []

    def transform(image):
        decoded.append(1)
        return image.float()

    loader = make_loader([pixels] * 10, TINY, transform=transform, batch_size=3)
    first = next(iter(loader))
    assert first[0].shape[0] == 3 and len(decoded) == 3  # nothing beyond the first batch was decoded


def test_workers_decode_the_same_and_raise_clean_errors(tmp_path, pixels):
    paths = []
    for i in range(6):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(np.roll(pixels, i, axis=1)).save(paths[-1])
    serial = torch.cat([images for images, _ in make_loader(paths, TINY, batch_size=2)])
    parallel = torch.cat([images for images, _ in make_loader(paths, TINY, batch_size=2, num_workers=2)])
    assert torch.equal(serial, parallel)
    os.remove(paths[4])
    with pytest.raises(ImageLoadError, match=r"^image 4 \(.*4\.png'\): file not found$"):
        list(make_loader(paths, TINY, batch_size=2, num_workers=2))
