"""The networks: EfficientNet family blocks and builders."""

from .blocks import Conv2dSame, ConvBNAct, MBConv
from .cost import count_macs, count_params
from .efficientnet import EfficientNet, efficientnet

__all__ = ["Conv2dSame", "ConvBNAct", "MBConv", "EfficientNet", "efficientnet", "count_params", "count_macs"]
