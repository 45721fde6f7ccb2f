"""The family as a table: what ``effsk info`` prints."""

from __future__ import annotations

import json

import pandas as pd

from ..nn.cost import count_macs, count_params
from ..scaling import PUBLISHED, resolve

__all__ = ["family_table", "render"]


def family_table(phis=None, scaling: str = "official", resolution: int | None = None) -> pd.DataFrame:
    """One row per variant: name, phi, width, depth, resolution, params, GFLOPs (multiply-adds),
    and whether ImageNet weights are available on this machine.

    >>> family_table(["b0", 1.5])[["name", "resolution"]].values.tolist()
    [['b0', 224], ['phi=1.5', 250]]
    """
    from ..weights.build import imagenet_weights_status

    phis = list(PUBLISHED) if phis is None else list(phis)
    rows = []
    for phi in phis:
        s = resolve(phi, scaling=scaling)
        res = resolution or s.resolution
        rows.append(
            {
                "name": s.label,
                "phi": s.phi,
                "width": round(s.width, 4),
                "depth": round(s.depth, 4),
                "resolution": res,
                "params": count_params(s),
                "gflops": round(count_macs(s, res) / 1e9, 3),
                "dropout": round(s.dropout, 3),
                "weights": imagenet_weights_status(s),
            }
        )
    return pd.DataFrame(rows)


def render(table: pd.DataFrame, fmt: str = "table") -> str:
    """Render for a terminal (``table``) or for scripts (``csv``, ``json``)."""
    if fmt == "csv":
        return table.to_csv(index=False).rstrip("\n")
    if fmt == "json":
        return json.dumps(table.to_dict(orient="records"), indent=2)
    shown = table.assign(params=table["params"].map(lambda n: f"{n / 1e6:.2f}M"))
    return shown.to_string(index=False)
