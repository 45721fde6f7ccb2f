"""Cost model against torchvision's published metadata and REFERENCE.md."""

import pytest
from torchvision.models import get_model_weights

from effsk.nn import count_macs, count_params, efficientnet
from effsk.nn.cost import _meta_model
from effsk.scaling import compound, resolve

# REFERENCE.md: torchvision GFLOPs (multiply-adds) and params of b0..b7.
TV_GFLOPS = {0: 0.386, 1: 0.687, 2: 1.088, 3: 1.827, 4: 4.394, 5: 10.266, 6: 19.068, 7: 37.746}
TV_PARAMS = {0: 5_288_548, 1: 7_794_184, 2: 9_109_994, 3: 12_233_232, 4: 19_341_616, 5: 30_389_784,
             6: 43_040_704, 7: 66_347_960}


@pytest.mark.parametrize("k", range(8))
def test_flops_match_torchvision_metadata_within_one_percent(k):
    # torchvision counts at its weights' eval crop (b2: 288, not 260), read from its own enum.
    weights = get_model_weights(f"efficientnet_b{k}").IMAGENET1K_V1
    crop = weights.transforms().crop_size[0]
    assert weights.meta["_ops"] == TV_GFLOPS[k]
    gflops = count_macs(f"b{k}", resolution=crop) / 1e9
    assert abs(gflops - TV_GFLOPS[k]) / TV_GFLOPS[k] < 0.01
    assert count_params(f"b{k}") == TV_PARAMS[k] == weights.meta["num_params"]


def test_macs_of_a_real_model_equal_the_meta_count():
    model = efficientnet("b0")
    assert count_macs(model, 64) == count_macs("b0", 64)
    assert next(model.parameters()).device.type == "cpu"  # counting did not move the real model


def test_paper_table2_flops_order_of_magnitude():
    # Paper Table 2 (multiply-adds at the published resolution): within 10% (rounded to 2 digits there).
    paper = {0: 0.39, 1: 0.70, 3: 1.8, 4: 4.2, 5: 9.9, 6: 19, 7: 37}
    for k, ref in paper.items():
        assert abs(count_macs(f"b{k}") / 1e9 - ref) / ref < 0.1


def test_params_and_flops_grow_monotonically_with_phi():
    # Every kind of step of scaling="official": B0, interpolation between published neighbours (0.5,
    # 3.5), a published step (1), B7 and the compound rule beyond it (8).
    phis = [0, 0.5, 1, 3.5, 7, 8]
    params = [count_params(p) for p in phis]
    flops = [count_macs(p) for p in phis]
    assert all(b >= a for a, b in zip(params, params[1:]))
    assert all(b >= a for a, b in zip(flops, flops[1:]))
    assert flops[-1] > 50 * flops[0]
    # compound scaling: FLOPs ~ 2^phi (alpha * beta^2 * gamma^2 = 1.92). Its phi = 0 is B0's network
    # (multipliers all 1), whose count is flops[0].
    assert compound(0) == (1, 1, 1)
    ratio = count_macs(4.0, scaling="compound") / flops[0]
    assert 1.92**4 * 0.7 < ratio < 1.92**4 * 1.3


def test_counts_of_one_config_are_reused_and_options_are_not_mixed_up():
    # torchvision b0 without its classifier (1280 x 1000 weights + 1000 biases): REFERENCE.md's count.
    assert count_params("b0", num_classes=0) == TV_PARAMS[0] - 1_281_000
    assert count_params("b0") == TV_PARAMS[0]
    assert count_macs("b0", 64) < count_macs("b0", 224) == count_macs("b0")
    assert count_params("b0", arch="efficientnet") == TV_PARAMS[0]
    # one model per resolved config, however phi is spelled
    assert _meta_model("b0", {}) is _meta_model(0, {}) is _meta_model(resolve("b0"), {"arch": "efficientnet"})
    assert _meta_model("b0", {}) is not _meta_model("b0", {"num_classes": 0})
