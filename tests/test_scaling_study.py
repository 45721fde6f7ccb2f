"""benchmarks/scaling_study.py: each scaling method grows only its own dimension and lands near the FLOPs
budget (multiply-adds counted here with torch's FlopCounterMode on the built model)."""

import importlib.util
import math
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from effsk.nn import build

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "scaling_study.py"


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("scaling_study", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _macs(arch, scaling):
    with torch.device("meta"):
        model = build(arch, scaling, num_classes=10).eval()
        x = torch.empty(1, 3, scaling.resolution, scaling.resolution)
        with FlopCounterMode(display=False) as counter:
            model(x)
    return counter.get_total_flops() // 2


def test_digits_are_rgb_uint8(study):
    X, y = study.digits_rgb()
    assert X.shape == (1797, 8, 8, 3) and X.dtype.name == "uint8" and X.max() == 255
    assert (X[..., 0] == X[..., 2]).all() and sorted(set(y.tolist())) == list(range(10))


def test_methods_grow_one_dimension_to_the_budget(study):
    arch = "mobilenet_v1"
    base = study.base_scaling(arch, width=0.25, depth=0.5, resolution=32)
    base_macs = _macs(arch, base)
    coefficients = (1.2, 1.1, 1.15)
    for method in study.METHODS:
        _, s = study.match_budget(arch, base, method, 2 * base_macs, coefficients, 8, 10)
        grown = {name for name in ("depth", "width", "resolution") if getattr(s, name) != getattr(base, name)}
        expected = {"depth", "width", "resolution"} if method == "compound" else {method}
        assert grown and grown <= expected and (method == "compound" or grown == expected)
        assert s.resolution % 8 == 0
        ratio = _macs(arch, s) / base_macs
        assert abs(math.log(ratio / 2)) < math.log(1.4), (method, ratio)
