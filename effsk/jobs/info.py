"""The family as a table: what ``effsk info`` prints.

Published variants are read from the weights registry (parameters, and multiply-adds where the
publisher counted them at the table's resolution); only the rest is counted, each model once.
"""

from __future__ import annotations

import json

import pandas as pd

from ..nn.cost import count_macs, count_params
from ..scaling import PUBLISHED, Scaling, resolve
from ..weights.registry import list_weights

__all__ = ["family_table", "render"]


def family_table(phis=None, scaling: str = "official", resolution: int | None = None) -> pd.DataFrame:
    """One row per variant: name, phi, width, depth, resolution, params, GFLOPs (multiply-adds),
    dropout, every registered weights name (``weights``) and those already on this machine
    (``on_machine``: in the torch hub cache, or in an installed package).

    >>> family_table(["b0", 1.5])[["name", "resolution", "weights"]].values.tolist()[1]
    ['phi=1.5', 250, '-']
    """
    phis = list(PUBLISHED) if phis is None else list(phis)
    rows = []
    for phi in phis:
        s = resolve(phi, scaling=scaling)
        res = resolution or s.resolution
        params, macs = _cost(s, res)
        entries = list_weights(s)
        rows.append(
            {
                "name": s.label,
                "phi": s.phi,
                "width": round(s.width, 4),
                "depth": round(s.depth, 4),
                "resolution": res,
                "params": params,
                "gflops": round(macs / 1e9, 3),
                "dropout": round(s.dropout, 3),
                "weights": ", ".join(e.name for e in entries) or "-",
                "on_machine": ", ".join(e.name for e in entries if e.source.local_file()) or "-",
            }
        )
    return pd.DataFrame(rows)


def _cost(s: Scaling, resolution: int) -> tuple[int, float]:
    """``(params, multiply-adds)``: the registry's published counts when it has them, else counted."""
    entries = list_weights(s)
    params = entries[0].meta.params if entries else count_params(s)
    published = [e.meta.gflops for e in entries if e.meta.gflops is not None and e.preprocessing.crop_size == resolution]
    return params, published[0] * 1e9 if published else count_macs(s, resolution)


def render(table: pd.DataFrame, fmt: str = "table") -> str:
    """Render for a terminal (``table``) or for scripts (``csv``, ``json``)."""
    if fmt == "csv":
        return table.to_csv(index=False).rstrip("\n")
    if fmt == "json":
        return json.dumps(table.to_dict(orient="records"), indent=2)
    shown = table.assign(params=table["params"].map(lambda n: f"{n / 1e6:.2f}M"))
    return shown.to_string(index=False)
