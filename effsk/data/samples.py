"""Small real image sets that ship with the installed libraries, for examples, demos and tests."""

from __future__ import annotations

__all__ = ["digits_rgb"]


def digits_rgb(size: int = 64, n: int | None = None, margin: int = 2):
    """sklearn's digits as ``(N, size, size, 3)`` uint8 RGB images, their labels and raw pixels.

    Each 8x8 digit gets a ``margin`` of blank page around it before bicubic upscaling, as in a photo
    of a written digit, so that a centre crop does not cut the ink.
    """
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    digits = load_digits()
    images, y = digits.images, digits.target
    if n is not None:
        images, y = images[:n], y[:n]
    # digits are 0 (white) .. 16 (black ink); draw dark ink on a light page like a photo of paper.
    grey = torch.from_numpy(255.0 - images * (255.0 / 16.0)).float()[:, None]
    grey = F.pad(grey, (margin,) * 4, value=255.0)
    big = F.interpolate(grey, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 255)
    rgb = big.round().to(torch.uint8).expand(-1, 3, -1, -1).permute(0, 2, 3, 1).contiguous().numpy()
    return rgb, y, images.reshape(len(images), -1)
