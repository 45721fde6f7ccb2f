"""One entry point for every network: ``build(arch, phi, ...)``.

phi means the same for every arch (resolved by :func:`effsk.scaling.resolve`); the arch picks the
base network. Estimators, the cost model and checkpoints go through here, and the per-arch
functions (:func:`efficientnet`, :func:`resnet50`, :func:`mobilenet_v2`, :func:`mobilenet_v1`)
are ``build`` with the arch filled in.
"""

from __future__ import annotations

from ..scaling import resolve
from .efficientnet import EfficientNet
from .mobilenet import MobileNetV1, MobileNetV2
from .resnet import ResNet

__all__ = ["ARCHITECTURES", "build", "efficientnet", "resnet50", "mobilenet_v2", "mobilenet_v1"]

#: Model class per arch; every class takes ``(scaling, num_classes=, drop_rate=, in_chans=)``
#: (EfficientNet also ``drop_path_rate=`` and ``same_padding=``).
ARCHITECTURES: dict[str, type] = {cls.arch: cls for cls in (EfficientNet, ResNet, MobileNetV2, MobileNetV1)}


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
        extra = dict(drop_path_rate=0.2 if drop_path_rate is None else drop_path_rate, same_padding=same_padding)
    elif drop_path_rate:
        raise ValueError(f"drop_path_rate={drop_path_rate!r}: arch={arch!r} has no stochastic depth; use None or 0.")
    elif same_padding:
        raise ValueError(f"same_padding=True is for TF-trained EfficientNets, not arch={arch!r}.")
    else:
        extra = {}
    return ARCHITECTURES[arch](config, num_classes=num_classes, drop_rate=drop_rate, in_chans=in_chans, **extra)


def efficientnet(phi="b0", **kwargs) -> EfficientNet:
    """Build an EfficientNet for any phi (randomly initialised; see :mod:`effsk.weights` to fill it).

    ``build("efficientnet", phi, **kwargs)``; see :func:`build` for the keyword arguments.

    Examples
    --------
    >>> from effsk.nn import efficientnet
    >>> model = efficientnet("b0")
    >>> model.num_features, sum(p.numel() for p in model.parameters())
    (1280, 5288548)
    >>> [f["channels"] for f in model.feature_info][1:8]
    [16, 24, 40, 80, 112, 192, 320]
    """
    return build("efficientnet", phi, **kwargs)


def resnet50(phi: float = 0, **kwargs) -> ResNet:
    """Compound-scaled ResNet-50 (randomly initialised); phi = 0 is torchvision's ``resnet50``.

    ``build("resnet50", phi, **kwargs)``; see :func:`build` for the keyword arguments.

    Examples
    --------
    >>> from effsk.nn import resnet50
    >>> model = resnet50(1)
    >>> model.scaling.resolution, [len(model.get_submodule(f"layer{i}")) for i in range(1, 5)]
    (258, [4, 5, 8, 4])
    """
    return build("resnet50", phi, **kwargs)


def mobilenet_v2(phi: float = 0, **kwargs) -> MobileNetV2:
    """Compound-scaled MobileNetV2 (randomly initialised): ``build("mobilenet_v2", phi, **kwargs)``.

    phi = 0 is torchvision's ``mobilenet_v2``; the head conv widens with width > 1 but never narrows.
    See :func:`build` for the keyword arguments.

    Examples
    --------
    >>> from effsk.nn import mobilenet_v2
    >>> [f["channels"] for f in mobilenet_v2(1).feature_info]  # stem, seven stages, head conv
    [32, 16, 24, 32, 72, 104, 176, 352, 1408]
    """
    return build("mobilenet_v2", phi, **kwargs)


def mobilenet_v1(phi: float = 0, **kwargs) -> MobileNetV1:
    """Compound-scaled MobileNetV1 (randomly initialised): ``build("mobilenet_v1", phi, **kwargs)``.

    phi = 2 is paper Table 3's compound model (d=1.4, w=1.2, r=1.3). See :func:`build` for the
    keyword arguments.

    Examples
    --------
    >>> import torch
    >>> from effsk.nn import mobilenet_v1
    >>> with torch.device("meta"):  # structure only: no memory, no initialisation
    ...     model = mobilenet_v1(2)
    >>> model.scaling.resolution, [len(stage) for stage in model.features[1:]]
    (291, [2, 3, 3, 9, 3])
    """
    return build("mobilenet_v1", phi, **kwargs)
