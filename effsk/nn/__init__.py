"""The networks: EfficientNet family blocks and builders, compound-scaled baselines, one ``build``.

Layer 1. Owns the modules (torchvision's names, so their state_dicts load unchanged), the cost model
and inference preparation. May import :mod:`effsk.scaling` and :mod:`effsk.utils` only.
"""

from .blocks import Conv2dSame, ConvBNAct, MBConv
from .cost import count_macs, count_params
from .efficientnet import EfficientNet
from .mobilenet import MobileNetV1, MobileNetV2
from .resnet import ResNet

# After the submodule imports: ``effsk.nn.efficientnet`` is the function, as it always was.
from .registry import ARCHITECTURES, build, efficientnet, mobilenet_v1, mobilenet_v2, resnet50

__all__ = [
    "Conv2dSame",
    "ConvBNAct",
    "MBConv",
    "EfficientNet",
    "efficientnet",
    "ResNet",
    "resnet50",
    "MobileNetV2",
    "mobilenet_v2",
    "MobileNetV1",
    "mobilenet_v1",
    "ARCHITECTURES",
    "build",
    "count_params",
    "count_macs",
]
