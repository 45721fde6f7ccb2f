"""effsk.data.gpu_decode on the CPU: the device-side pipeline (JPEG decode, batched resize/crop/normalise)
against the reference path, effsk.data.images' decode + eval_transform, item by item; routing of what the
device decoder may take; errors; and the num_workers="auto" rules. The CUDA side is in test_gpu.py."""

import io

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_sample_images

from effsk.data import gpu_decode
from effsk.data.gpu_decode import (
    MAX_AUTO_WORKERS,
    decode_on_device,
    device_decodable,
    make_device_loader,
    preprocess_on_device,
    resolve_num_workers,
)
from effsk.data.images import ImageLoadError, load_image, make_loader
from effsk.data.preprocessing import LITE_MEAN, LITE_STD, Preprocessing

PHOTOS = load_sample_images().images  # china.jpg 427x640, flower.jpg 427x640
PREP = Preprocessing(crop_size=56, resize_size=64)  # torchvision's bicubic ImageNet recipe, small
# One step of uint8 rounding after the resize, in normalised units: the two paths may round a pixel differently.
ONE_LEVEL = 1 / 255 / min(PREP.std)


def jpeg(array, **save):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=90, **save)
    return buffer.getvalue()


def encoded(image: Image.Image, fmt: str, **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """Every kind of item, photo crops of several sizes: JPEG files and bytes (baseline, progressive,
    grayscale, CMYK, EXIF-rotated), PNG with alpha, arrays, a PIL image, a tensor."""
    folder = tmp_path_factory.mktemp("mixed")
    china, flower = PHOTOS
    paths = []
    for k, (photo, box) in enumerate([(china, (0, 0, 300, 400)), (flower, (50, 100, 250, 260)), (china, (100, 0, 300, 200))]):
        path = folder / f"photo{k}.jpg"
        path.write_bytes(jpeg(photo[box[0]:box[2], box[1]:box[3]]))
        paths.append(str(path))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    rotated = encoded(Image.fromarray(flower[:120, :200]), "JPEG", exif=exif)
    png = np.dstack([china[:90, :130], np.full((90, 130), 200, np.uint8)])
    X = [
        paths[0],
        jpeg(flower[:200, :300], progressive=True),
        paths[1],
        encoded(Image.fromarray(china[:150, :150, 0]), "JPEG"),  # grayscale
        encoded(Image.fromarray(flower[:100, :160]).convert("CMYK"), "JPEG"),
        rotated,
        encoded(Image.fromarray(png, "RGBA"), "PNG"),
        flower[200:300, 100:250].copy(),
        Image.fromarray(china[300:, 300:500]),
        torch.from_numpy(china[:64, :80].copy()).permute(2, 0, 1).contiguous(),
        paths[2],
        jpeg(china[:300, :400]),  # the same size as paths[0]: resized together with it
    ]
    return X


def reference(X, prep=PREP, **kwargs):
    """effsk.data.images' own path: decode each item, eval_transform, stack."""
    return torch.cat([images for images, _ in make_loader(X, prep, batch_size=5, **kwargs)])


def device_path(X, prep=PREP, **kwargs):
    return torch.cat([images for images, _ in make_device_loader(X, prep, device="cpu", batch_size=5, **kwargs)])


def test_device_path_equals_decode_plus_eval_transform(mixed):
    expected = reference(mixed)
    got = device_path(mixed)
    assert got.shape == expected.shape == (len(mixed), 3, 56, 56) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=ONE_LEVEL * 1.01)
    assert (got - expected).abs().mean() < 0.01 * ONE_LEVEL  # rounding differences are rare, not systematic


def test_cpu_fallback_alone_equals_decode_plus_eval_transform(mixed, monkeypatch):
    """Everything through the fallback (what a machine without nvJPEG, or a non-JPEG, takes)."""
    monkeypatch.setattr(gpu_decode, "device_decodable", lambda data: False)
    torch.testing.assert_close(device_path(mixed), reference(mixed), rtol=0, atol=ONE_LEVEL * 1.01)


def test_lite_preprocessing_and_bilinear_also_match(mixed):
    """Another interpolation, normalisation and crop ratio (the Lite weights' recipe, bilinear)."""
    prep = Preprocessing(crop_size=48, resize_size=80, interpolation="bilinear", mean=LITE_MEAN, std=LITE_STD)
    torch.testing.assert_close(device_path(mixed, prep), reference(mixed, prep), rtol=0, atol=1.01 / 255 / min(LITE_STD))


def test_routing_sends_only_plain_jpegs_to_the_device_decoder(mixed, monkeypatch):
    china = PHOTOS[0]
    assert device_decodable(jpeg(china[:50, :50]))
    assert device_decodable(jpeg(china[:50, :50], progressive=True))
    assert device_decodable(mixed[3])  # grayscale: decoded as RGB on the device
    assert not device_decodable(mixed[4])  # CMYK: PIL converts it
    assert not device_decodable(mixed[5])  # EXIF rotation: applied on the CPU
    assert not device_decodable(mixed[6])  # PNG
    assert not device_decodable(b"\xff\xd8\xff" + b"\x00" * 40)  # a JPEG signature and no header
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 49 * 49)
    assert not device_decodable(jpeg(china[:50, :50]))  # too large: the CPU path raises "decompression bomb"
    loader = make_device_loader([jpeg(china[:50, :50])], PREP, device="cpu", return_errors=True)
    with pytest.raises(ImageLoadError, match="image 0: decompression bomb"):
        list(loader)


def test_a_jpeg_the_device_decoder_rejects_is_decoded_on_the_cpu(monkeypatch):
    """nvJPEG refuses some JPEGs libjpeg takes (and then the whole batched call fails): each image is
    retried alone, and the one still refused is decoded on the CPU."""
    china, flower = PHOTOS
    good, refused = jpeg(china[:120, :160]), jpeg(flower[:100, :100])
    real = gpu_decode._device_jpeg_decode
    calls = []

    def picky(encoded_images, device):
        batch = encoded_images if isinstance(encoded_images, list) else [encoded_images]
        calls.append(len(batch) if isinstance(encoded_images, list) else "single")
        if any(t.numpy().tobytes() == refused for t in batch):
            raise RuntimeError("nvjpegDecodeBatched: unsupported JPEG")
        return real(encoded_images, device)

    monkeypatch.setattr(gpu_decode, "_device_jpeg_decode", picky)
    decoded = decode_on_device([torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in (good, refused, good)], "cpu")
    assert calls == [3, "single", "single", "single"]
    for image, data in zip(decoded, (good, refused, good)):
        assert torch.equal(image, load_image(data))


def test_errors_name_the_item_or_become_nan_rows(mixed, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    X = [mixed[0], str(tmp_path / "missing.jpg"), mixed[1], str(broken), mixed[7]]
    with pytest.raises(ImageLoadError, match=r"image 1 \('.*missing\.jpg'\): file not found"):
        device_path(X)
    loader = make_device_loader(X, PREP, device="cpu", batch_size=5, on_error="nan", return_errors=True)
    [(images, indices, errors)] = list(loader)
    assert indices.tolist() == [0, 1, 2, 3, 4]
    assert [(index, path) for index, path, _ in errors] == [(1, str(tmp_path / "missing.jpg")), (3, str(broken))]
    assert torch.isnan(images[[1, 3]]).all() and not torch.isnan(images[[0, 2, 4]]).any()
    torch.testing.assert_close(images[[0, 2, 4]], reference([X[0], X[2], X[4]]), rtol=0, atol=ONE_LEVEL * 1.01)
    with pytest.raises(ValueError, match="on_error="):
        make_device_loader(X, PREP, device="cpu", on_error="skip")


def test_subsets_and_workers_keep_positions(mixed):
    indices = [11, 0, 6, 2]
    loader = make_device_loader(mixed, PREP, device="cpu", batch_size=3, indices=indices, num_workers=2)
    batches = list(loader)
    assert len(loader) == 2 and [idx.tolist() for _, idx in batches] == [[11, 0, 6], [2]]
    got = torch.cat([images for images, _ in batches])
    torch.testing.assert_close(got, reference([mixed[i] for i in indices]), rtol=0, atol=ONE_LEVEL * 1.01)


def test_preprocess_on_device_groups_sizes_and_keeps_order():
    rng = np.random.default_rng(0)
    images = [torch.from_numpy(rng.integers(0, 256, (3, h, w), dtype=np.uint8)) for h, w in [(70, 90), (64, 64), (70, 90)]]
    batch = preprocess_on_device(images, PREP)
    from effsk.data.transforms import eval_transform

    expected = torch.stack([eval_transform(PREP)(image) for image in images])
    torch.testing.assert_close(batch, expected, rtol=0, atol=ONE_LEVEL * 1.01)
    with pytest.raises(ValueError, match="no images"):
        preprocess_on_device([], PREP)


def test_auto_workers_scale_with_the_machine(monkeypatch):
    assert resolve_num_workers(0, "cuda") == 0 and resolve_num_workers(5, "cpu") == 5
    assert resolve_num_workers(np.int64(2), "cpu") == 2
    for bad in (-1, 1.5, True, "many"):
        with pytest.raises(ValueError, match="num_workers="):
            resolve_num_workers(bad, "cpu")
    cuda = [resolve_num_workers("auto", "cuda", cores=c) for c in (1, 2, 3, 4, 8, 9, 16, 128)]
    assert cuda == [0, 0, 2, 3, 7, 8, 8, 8]  # one core left to the process feeding the GPU, at most 8
    assert max(cuda) == MAX_AUTO_WORKERS
    assert [resolve_num_workers("auto", "cpu", cores=c) for c in (1, 2, 3, 64)] == [0, 0, 1, 1]
    assert resolve_num_workers("auto", torch.device("mps"), cores=6) == 5
    monkeypatch.setattr(gpu_decode, "_available_cores", lambda: 16)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert resolve_num_workers("auto", "cuda") == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun: four processes share the 16 cores
    assert resolve_num_workers("auto", "cuda") == 3
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert resolve_num_workers("auto", "cuda") == 0
