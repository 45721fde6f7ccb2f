"""Small synthetic image sets whose targets are visible, so tiny fits learn them in seconds."""

import numpy as np


def tinted_images(n, n_classes=3, size=32, seed=0):
    """(n, size, size, 3) uint8 noise images, class k tinted towards colour channel k."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % n_classes
    rng.shuffle(y)
    X = rng.integers(0, 90, size=(n, size, size, 3))
    for k in range(n_classes):
        X[y == k, :, :, k % 3] += 110 if k < 3 else 0
        if k >= 3:  # beyond three classes: a bright horizontal band marks the class
            X[y == k, size // 3 : 2 * size // 3, :, :] += 120
    return np.clip(X, 0, 255).astype(np.uint8), y


def channel_mix_images(n, size=32, seed=0, noise=40):
    """Images with per-channel intensity levels plus pixel noise in [0, noise); returns X and the
    levels in [0, 1], shape (n, 3). ``noise=0``: flat colours, the easiest regression there is."""
    rng = np.random.default_rng(seed)
    levels = rng.uniform(0, 1, size=(n, 3))
    X = rng.integers(0, max(noise, 1), size=(n, size, size, 3)) + (levels[:, None, None, :] * 200).astype(int)
    return np.clip(X, 0, 255).astype(np.uint8), levels


def randomise_batchnorm(model, generator=0, scale=0.1, var=(0.5, 1.5)):
    """Give every BatchNorm2d non-trivial statistics and affine terms (in place; returns ``model``),
    so that parity and folding tests can fail. ``generator``: a torch.Generator or a seed."""
    import torch
    from torch import nn

    if not isinstance(generator, torch.Generator):
        generator = torch.Generator().manual_seed(int(generator))
    low, high = var
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=generator) * scale)
                m.running_var.copy_(torch.rand(m.num_features, generator=generator) * (high - low) + low)
                m.weight.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=generator) * scale)
    return model
