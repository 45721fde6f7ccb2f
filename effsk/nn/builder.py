"""Architecture as data, turned into modules (timm's ``_efficientnet_builder`` idea).

A network's body is a table of :class:`~effsk.scaling.StageSpec` rows; :func:`scale_stages` applies
a width and depth multiplier to such a table and :func:`stage_blocks` turns it into blocks, one list
per stage, with the rule every family here shares: the first block of a stage maps the stage's input
width to its output width at the stage's stride, the others keep the output width at stride 1.
:func:`feature_info` describes the resulting stages. The model classes only assemble stem, stages
and head from what these return.
"""

from __future__ import annotations

from dataclasses import replace
from itertools import accumulate
from operator import mul
from typing import Callable, Sequence

from torch import nn

from ..scaling import StageSpec, round_channels, round_repeats

__all__ = ["BlockFactory", "chain_stages", "feature_info", "scale_stages", "stage_blocks"]

#: ``make_block(spec, in_channels, stride, index)`` -> one block of the stage ``spec`` describes;
#: ``index`` counts blocks over all stages from 0 (for schedules such as stochastic depth).
BlockFactory = Callable[[StageSpec, int, int, int], nn.Module]


def chain_stages(in_channels: int, rows: Sequence[tuple[int, int, int, int, int]]) -> tuple[StageSpec, ...]:
    """A stage table from compact ``(expand_ratio, kernel, stride, out_channels, repeats)`` rows; each
    stage's input width is the previous stage's output (the first's is ``in_channels``, the stem's).

    Examples
    --------
    >>> chain_stages(32, [(1, 3, 1, 16, 1), (6, 3, 2, 24, 2)])[1]
    StageSpec(expand_ratio=6, kernel=3, stride=2, in_channels=16, out_channels=24, repeats=2)
    """
    specs = []
    for expand_ratio, kernel, stride, out_channels, repeats in rows:
        specs.append(StageSpec(expand_ratio, kernel, stride, in_channels, out_channels, repeats))
        in_channels = out_channels
    return tuple(specs)


def scale_stages(specs: Sequence[StageSpec], width: float, depth: float) -> tuple[StageSpec, ...]:
    """``specs`` with every channel count scaled by ``width`` (:func:`~effsk.scaling.round_channels`)
    and every repeat count by ``depth`` (:func:`~effsk.scaling.round_repeats`).

    Examples
    --------
    >>> from effsk.scaling import StageSpec
    >>> scale_stages([StageSpec(6, 3, 2, 16, 24, 2)], width=1.1, depth=1.2)
    (StageSpec(expand_ratio=6, kernel=3, stride=2, in_channels=16, out_channels=24, repeats=3),)
    """
    return tuple(
        replace(
            s,
            in_channels=round_channels(s.in_channels, width),
            out_channels=round_channels(s.out_channels, width),
            repeats=round_repeats(s.repeats, depth),
        )
        for s in specs
    )


def stage_blocks(specs: Sequence[StageSpec], make_block: BlockFactory) -> list[list[nn.Module]]:
    """The blocks of each stage, built in order by ``make_block`` (see :data:`BlockFactory`).

    Examples
    --------
    >>> from torch import nn
    >>> from effsk.scaling import StageSpec
    >>> specs = [StageSpec(1, 3, 2, 8, 16, 2), StageSpec(1, 3, 1, 16, 32, 1)]
    >>> conv = lambda spec, c_in, stride, index: nn.Conv2d(c_in, spec.out_channels, 3, stride)
    >>> [[(b.in_channels, b.out_channels, b.stride[0]) for b in stage] for stage in stage_blocks(specs, conv)]
    [[(8, 16, 2), (16, 16, 1)], [(16, 32, 1)]]
    """
    stages, index = [], 0
    for spec in specs:
        blocks = []
        for i in range(spec.repeats):
            in_channels, stride = (spec.in_channels, spec.stride) if i == 0 else (spec.out_channels, 1)
            blocks.append(make_block(spec, in_channels, stride, index))
            index += 1
        stages.append(blocks)
    return stages


def feature_info(modules: Sequence[str], channels: Sequence[int], strides: Sequence[int]) -> list[dict]:
    """``feature_info`` rows of consecutive stages: the module each stage ends in, its output width,
    and its ``reduction`` (the product of the strides so far).

    Examples
    --------
    >>> feature_info(["stem", "layer1"], [32, 64], [2, 2])[1]
    {'index': 1, 'module': 'layer1', 'channels': 64, 'reduction': 4}
    """
    reductions = accumulate(strides, mul)
    return [
        dict(index=i, module=module, channels=c, reduction=r)
        for i, (module, c, r) in enumerate(zip(modules, channels, reductions, strict=True))
    ]
