"""One entry point for every network: ``build(arch, phi, ...)``.

phi means the same for every arch (resolved by :func:`effsk.scaling.resolve`); the arch picks the
base network. Estimators, the cost model and checkpoints go through here.
"""

from __future__ import annotations

from ..scaling import resolve
from .efficientnet import EfficientNet
from .mobilenet import MobileNetV1, MobileNetV2
from .resnet import ResNet

__all__ = ["ARCHITECTURES", "build"]

#: Model class per arch; every class takes ``(scaling, num_classes=, drop_rate=, in_chans=)``.
ARCHITECTURES: dict[str, type] = {
    "efficientnet": EfficientNet,
    "resnet50": ResNet,
    "mobilenet_v2": MobileNetV2,
    "mobilenet_v1": MobileNetV1,
}


def build(
    arch: str,
    phi,
    *,
    num_classes: int = 1000,
    scaling: str = "official",
    alpha: float | None = None,
    beta: float | None = None,
    gamma: float | None = None,
    drop_rate: float | None = None,
    drop_path_rate: float | None = None,
    in_chans: int = 3,
    same_padding: bool = False,
):
    """Build a randomly initialised ``arch`` scaled by ``phi`` (see :mod:`effsk.weights` to fill it).

    Parameters
    ----------
    arch : {"efficientnet", "resnet50", "mobilenet_v2", "mobilenet_v1"}
        Base network. phi = 0 of a baseline is torchvision's architecture (MobileNetV1: TF-slim's).
    phi : str, float or Scaling
        Compound coefficient; published names (``"b0"``, ``"lite2"``) are EfficientNet variants.
    num_classes : int, default=1000
        Classifier size; 0 gives a model whose head returns pooled features.
    scaling : {"official", "compound"}
        EfficientNet's published table or the exact compound rule (baselines: always the rule).
    alpha, beta, gamma : float, optional
        Compound bases; default: the arch's (:data:`effsk.scaling.ARCH_DEFAULTS`).
    drop_rate : float, optional
        Classifier dropout; default: the config's.
    drop_path_rate : float, optional
        Stochastic depth (EfficientNet only, default 0.2); the baselines' torchvision blocks have none.
    in_chans : int, default=3
        Input channels.
    same_padding : bool, default=False
        TF "same" padding (EfficientNet only; needed by TF-trained Lite weights).

    Examples
    --------
    >>> import torch
    >>> from effsk.nn import build
    >>> with torch.device("meta"):
    ...     model = build("mobilenet_v2", 0, num_classes=10)
    >>> type(model).__name__, model.scaling.resolution, model.num_features
    ('MobileNetV2', 224, 1280)
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"arch={arch!r} is not valid; use one of {tuple(ARCHITECTURES)}.")
    config = resolve(phi, scaling=scaling, alpha=alpha, beta=beta, gamma=gamma, arch=arch)
    if arch == "efficientnet":
        return EfficientNet(
            config,
            num_classes=num_classes,
            drop_rate=drop_rate,
            drop_path_rate=0.2 if drop_path_rate is None else drop_path_rate,
            in_chans=in_chans,
            same_padding=same_padding,
        )
    if drop_path_rate:
        raise ValueError(f"drop_path_rate={drop_path_rate!r}: arch={arch!r} has no stochastic depth; use None or 0.")
    if same_padding:
        raise ValueError(f"same_padding=True is for TF-trained EfficientNets, not arch={arch!r}.")
    return ARCHITECTURES[arch](config, num_classes=num_classes, drop_rate=drop_rate, in_chans=in_chans)
