"""EfficientNet (B0..B7, any phi, Lite) built from a :class:`~effsk.scaling.Scaling`.

Module names follow torchvision's ``efficientnet_bK`` exactly (``features.S.I.block.K``,
``classifier.1``), so torchvision state_dicts load unchanged and outputs match for the same weights.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Sequence

from torch import nn

from ..scaling import Scaling, StageSpec
from .blocks import Conv2dSame, ConvBNAct, MBConv
from .builder import stage_blocks
from .staged import SequentialStagedModel

__all__ = ["EfficientNet", "mbconv_stages"]


def mbconv_stages(
    specs: Sequence[StageSpec],
    *,
    drop_path_rate: float,
    norm_layer: Callable[..., nn.Module],
    activation_layer: Callable[..., nn.Module],
    squeeze_excite: bool = True,
    conv_layer: type[nn.Conv2d] = nn.Conv2d,
) -> list[nn.Sequential]:
    """EfficientNet's body: one ``nn.Sequential`` of :class:`~effsk.nn.MBConv` blocks per StageSpec.

    Block i of N (counted over all stages) drops its residual with rate ``drop_path_rate * i / N``
    (torchvision's schedule).

    Examples
    --------
    >>> from torch import nn
    >>> from effsk.scaling import resolve
    >>> stages = mbconv_stages(resolve("b0").stages, drop_path_rate=0.2, norm_layer=nn.BatchNorm2d,
    ...                        activation_layer=nn.SiLU)
    >>> [len(stage) for stage in stages], stages[-1][0].stochastic_depth.p
    ([1, 2, 2, 3, 3, 4, 1], 0.1875)
    """
    total_blocks = sum(spec.repeats for spec in specs)

    def mbconv(spec: StageSpec, in_channels: int, stride: int, index: int) -> MBConv:
        return MBConv(
            in_channels,
            spec.out_channels,
            spec.kernel,
            stride,
            spec.expand_ratio,
            drop_path_rate * index / total_blocks,
            norm_layer=norm_layer,
            activation_layer=activation_layer,
            squeeze_excite=squeeze_excite,
            conv_layer=conv_layer,
        )

    return [nn.Sequential(*blocks) for blocks in stage_blocks(specs, mbconv)]


class EfficientNet(SequentialStagedModel):
    """An EfficientNet built from a resolved scaling config.

    Parameters
    ----------
    scaling : Scaling
        Resolved configuration (see :func:`effsk.scaling.resolve`).
    num_classes : int, default=1000
        Size of the classifier; 0 gives a model whose head returns pooled features.
    drop_rate : float, optional
        Classifier dropout; defaults to the variant's published dropout.
    drop_path_rate : float, default=0.2
        Stochastic depth rate of the last block (block i of N drops with rate * i / N).
    in_chans : int, default=3
        Input channels.
    same_padding : bool, default=False
        TF-style "same" padding in every convolution (needed by TF-trained weights).

    Attributes
    ----------
    feature_info : list of dict
        For each entry of ``features`` (stem, the seven stages, head conv): ``index``, ``module``,
        ``channels`` and ``reduction`` (stride relative to the input).
    num_features : int
        Width of the pooled features fed to the classifier.
    """

    arch = "efficientnet"

    def __init__(
        self,
        scaling: Scaling,
        num_classes: int = 1000,
        drop_rate: float | None = None,
        drop_path_rate: float = 0.2,
        in_chans: int = 3,
        same_padding: bool = False,
    ):
        super().__init__(scaling, num_classes, drop_rate)
        self.same_padding = same_padding
        layers = dict(
            norm_layer=partial(nn.BatchNorm2d, eps=scaling.bn_eps, momentum=scaling.bn_momentum),
            activation_layer=nn.ReLU6 if scaling.lite else nn.SiLU,
            conv_layer=Conv2dSame if same_padding else nn.Conv2d,
        )
        specs = scaling.stages
        stem = ConvBNAct(in_chans, scaling.stem_channels, 3, 2, **layers)
        body = mbconv_stages(specs, drop_path_rate=drop_path_rate, squeeze_excite=not scaling.lite, **layers)
        head = ConvBNAct(specs[-1].out_channels, scaling.head_channels, 1, **layers)
        self._set_stages(
            [[stem], *([stage] for stage in body), [head]],
            channels=[scaling.stem_channels, *(s.out_channels for s in specs), scaling.head_channels],
            strides=[2, *(s.stride for s in specs), 1],
        )
        self.classifier = self._make_classifier(inplace_dropout=True)
        self._init_weights()

    def _init_fc(self, fc: nn.Linear) -> None:
        # torchvision's EfficientNet: uniform in +-1/sqrt(num_classes), zero bias.
        bound = 1.0 / fc.out_features**0.5
        nn.init.uniform_(fc.weight, -bound, bound)
        nn.init.zeros_(fc.bias)

