"""Compound-scaled baselines against torchvision (built here, in the test), REFERENCE.md and the
paper's rules, computed independently in the test."""

import math
from collections import Counter

import pytest
from synthetic import randomise_batchnorm
import torch
import torchvision.models as tvm
from torch import nn
from torchvision.models import get_model_weights
from torchvision.models.mobilenetv2 import InvertedResidual
from torchvision.models.resnet import Bottleneck

from effsk.nn import (
    EfficientNet,
    MobileNetV1,
    MobileNetV2,
    ResNet,
    build,
    count_macs,
    count_params,
    efficientnet,
    mobilenet_v1,
    mobilenet_v2,
    resnet50,
)
from effsk.scaling import compound, resolve

BASELINES = ("resnet50", "mobilenet_v2", "mobilenet_v1")
# Compound bases chosen per arch (effsk.scaling.ARCH_DEFAULTS docs): EfficientNet's for ResNet-50 and
# MobileNetV2; for MobileNetV1 the square roots of paper Table 3's compound point d=1.4, w=1.2, r=1.3.
BASES = {
    "resnet50": (1.2, 1.1, 1.15),
    "mobilenet_v2": (1.2, 1.1, 1.15),
    "mobilenet_v1": (1.4**0.5, 1.2**0.5, 1.3**0.5),
}
# REFERENCE.md, paper Table 3: baseline and compound-scaled FLOPs (multiply-adds, billions) at 224.
TABLE3_BASELINE = {"resnet50": 4.1, "mobilenet_v2": 0.3, "mobilenet_v1": 0.6}
TABLE3_COMPOUND = {"resnet50": 16.7, "mobilenet_v2": 1.3, "mobilenet_v1": 2.3}


def _round8(value):
    """REFERENCE.md rounding: max(8, int(v + 4) // 8 * 8), plus 8 when under 90% of v."""
    new = max(8, int(value + 4) // 8 * 8)
    return new + 8 if new < 0.9 * value else new


def _assert_same_network(ours, tv, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    tv.eval()
    ours.eval()
    with torch.no_grad():
        randomise_batchnorm(tv, g)
    tv_sd, our_sd = tv.state_dict(), ours.state_dict()
    assert list(our_sd) == list(tv_sd)
    assert all(our_sd[key].shape == tv_sd[key].shape for key in tv_sd)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in tv.parameters())
    eps = {(m.eps, m.momentum) for m in ours.modules() if isinstance(m, nn.BatchNorm2d)}
    assert eps == {(m.eps, m.momentum) for m in tv.modules() if isinstance(m, nn.BatchNorm2d)}
    ours.load_state_dict(tv_sd)
    x = torch.randn(2, 3, size, size, generator=g)
    with torch.no_grad():
        expected = tv(x)
        assert expected.abs().max() > 1e-2  # the comparison is not between two near-zero outputs
        assert (ours(x) - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize("arch", ["resnet50", "mobilenet_v2"])
def test_seeded_build_initialises_like_torchvision(arch):
    # Same modules in the same order, initialised by torchvision's scheme: a seed gives the same weights.
    torch.manual_seed(0)
    ours = build(arch, 0)
    torch.manual_seed(0)
    tv = getattr(tvm, arch)()
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), tv.state_dict().values(), strict=True))


def test_resnet50_phi0_equals_torchvision():
    _assert_same_network(resnet50(0), tvm.resnet50())


def test_mobilenet_v2_phi0_equals_torchvision():
    _assert_same_network(mobilenet_v2(0), tvm.mobilenet_v2(), seed=1)


def test_scaled_mobilenet_v2_equals_torchvision_with_the_same_width_and_repeats():
    # phi=1: width 1.1 (torchvision's width_mult uses the same divisible-by-8 rule), repeats ceil(1.2 n).
    setting = [[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 3, 2], [6, 64, 4, 2], [6, 96, 3, 1], [6, 160, 3, 2], [6, 320, 1, 1]]
    scaled = [[t, c, math.ceil(1.2 * n), s] for t, c, n, s in setting]
    tv = tvm.MobileNetV2(width_mult=1.1, inverted_residual_setting=scaled)
    _assert_same_network(mobilenet_v2(1), tv, size=48, seed=2)


def test_depth_scaled_resnet_equals_torchvision_resnet_with_those_blocks():
    # width base 1 isolates depth: ceil(1.2 * (3, 4, 6, 3)) = (4, 5, 8, 4) bottlenecks.
    tv = tvm.ResNet(Bottleneck, [4, 5, 8, 4])
    _assert_same_network(resnet50(1, beta=1.0), tv, size=48, seed=3)


@pytest.mark.parametrize("arch", ["resnet50", "mobilenet_v2"])
def test_phi0_cost_matches_torchvision_metadata_and_paper_table3(arch):
    meta = get_model_weights(arch).IMAGENET1K_V1.meta
    gmacs = count_macs(0, arch=arch) / 1e9
    assert abs(gmacs - meta["_ops"]) / meta["_ops"] < 0.01
    assert abs(gmacs - TABLE3_BASELINE[arch]) / TABLE3_BASELINE[arch] < 0.03
    assert count_params(0, arch=arch) == meta["num_params"]


def _mobilenet_v1_cost(width, depth, resolution, num_classes=1000):
    """Closed-form params and multiply-adds of MobileNetV1 (Howard et al. 2017, Table 1): stem
    conv3x3/2, then depthwise-separable blocks; BN has 2 parameters per channel; 'same' padding."""
    plan = [(64, 1, 1), (128, 2, 2), (256, 2, 2), (512, 6, 2), (1024, 2, 2)]
    c_in, size = _round8(32 * width), math.ceil(resolution / 2)
    params, macs = 27 * c_in + 2 * c_in, 27 * c_in * size * size
    for channels, blocks, stride in plan:
        c_out = _round8(channels * width)
        for i in range(math.ceil(depth * blocks)):
            size = math.ceil(size / (stride if i == 0 else 1))
            params += 9 * c_in + 2 * c_in + c_in * c_out + 2 * c_out
            macs += (9 * c_in + c_in * c_out) * size * size
            c_in = c_out
    return params + c_in * num_classes + num_classes, macs + c_in * num_classes


@pytest.mark.parametrize("phi", [0, 2, 3.5])
def test_mobilenet_v1_cost_matches_closed_form(phi):
    a, b, g = BASES["mobilenet_v1"]
    resolution = round(224 * g**phi)
    params, macs = _mobilenet_v1_cost(b**phi, a**phi, resolution)
    assert count_params(phi, arch="mobilenet_v1") == params
    assert count_macs(phi, arch="mobilenet_v1") == macs
    if phi == 0:
        # MobileNets paper: 569M multiply-adds, 4.2M parameters; REFERENCE.md Table 3: 0.6B.
        assert round(macs / 1e9, 1) == TABLE3_BASELINE["mobilenet_v1"] and round(params / 1e6, 1) == 4.2


def _stage_plan(model):
    """(blocks, output channels) per stage, read from the module tree."""
    if isinstance(model, ResNet):
        layers = [model.get_submodule(f"layer{i}") for i in range(1, 5)]
        return [(len(layer), layer[-1].bn3.num_features) for layer in layers]
    if isinstance(model, MobileNetV2):
        outs = Counter(m.out_channels for m in model.modules() if isinstance(m, InvertedResidual))
        return [(n, c) for c, n in outs.items()]
    return [(len(stage), stage[-1][1][0].out_channels) for stage in model.features[1:]]


BASE_PLAN = {
    "resnet50": [(3, 256), (4, 512), (6, 1024), (3, 2048)],
    "mobilenet_v2": [(1, 16), (2, 24), (3, 32), (4, 64), (3, 96), (3, 160), (1, 320)],
    "mobilenet_v1": [(1, 64), (2, 128), (2, 256), (6, 512), (2, 1024)],
}


@pytest.mark.parametrize("arch", BASELINES)
@pytest.mark.parametrize("phi", [0.5, 1, 2.5])
def test_depth_width_resolution_follow_the_compound_rule(arch, phi):
    a, b, g = BASES[arch]
    with torch.device("meta"):
        model = build(arch, phi)
    expansion = 4 if arch == "resnet50" else 1
    expected = [(math.ceil(a**phi * n), expansion * _round8(c // expansion * b**phi)) for n, c in BASE_PLAN[arch]]
    assert _stage_plan(model) == expected
    assert model.scaling.resolution == round(224 * g**phi)
    assert (model.scaling.depth, model.scaling.width) == pytest.approx((a**phi, b**phi))


@pytest.mark.parametrize("arch", BASELINES)
def test_flops_and_params_grow_with_phi_about_two_fold_per_step(arch):
    with torch.device("meta"):
        models = [build(arch, i / 2) for i in range(9)]
    flops = [count_macs(m) for m in models]
    params = [count_params(m) for m in models]
    assert all(y > x for x, y in zip(flops, flops[1:]))
    assert all(y > x for x, y in zip(params, params[1:]))
    a, b, g = BASES[arch]
    per_step = a * b**2 * g**2
    assert 1.8 < per_step <= 2.0  # the paper's constraint alpha * beta^2 * gamma^2 ~= 2
    # Ceil rounding of 1-3 block stages overshoots at small phi; it averages out over four steps.
    assert 1.6 < flops[2] / flops[0] < 2.8
    assert 0.75 < flops[8] / flops[0] / per_step**4 < 1.3


@pytest.mark.parametrize("arch", BASELINES)
def test_phi2_is_near_paper_table3_compound_models(arch):
    # Table 3's compound models are ~4x the baseline's FLOPs; the paper gives only MobileNetV1's
    # coefficients, so the others are compared loosely.
    gmacs = count_macs(2, arch=arch) / 1e9
    assert abs(gmacs - TABLE3_COMPOUND[arch]) / TABLE3_COMPOUND[arch] < 0.2


def test_mobilenet_v1_phi2_is_table3_compound_point():
    s = resolve(2, arch="mobilenet_v1")
    assert (s.depth, s.width, s.resolution) == (pytest.approx(1.4), pytest.approx(1.2), round(224 * 1.3))


@pytest.mark.parametrize("arch", BASELINES)
def test_model_interface_matches_efficientnet(arch):
    torch.manual_seed(0)
    model = build(arch, 0, num_classes=7).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        fmap = model.forward_features(x)
        assert fmap.shape == (2, model.num_features, 2, 2)
        pooled = model.forward_head(fmap, pre_logits=True)
        torch.testing.assert_close(pooled, fmap.mean((2, 3)))
        logits = model(x)
        torch.testing.assert_close(model.forward_head(fmap), logits)
        assert logits.shape == (2, 7)
        last = len(model.feature_info) - 1
        maps = model.forward_intermediates(x, [last, 0, 2])
    for idx, fm in zip([last, 0, 2], maps):
        info = model.feature_info[idx]
        assert fm.shape[1] == info["channels"] and fm.shape[-1] == 64 // info["reduction"]
        assert info["index"] == idx
        model.get_submodule(info["module"])  # names a real module
    torch.testing.assert_close(maps[0], fmap)
    assert model.feature_info[-1]["reduction"] == 32 and model.feature_info[-1]["channels"] == model.num_features
    with pytest.raises(ValueError, match=f"0..{last}"):
        model.forward_intermediates(x, [last + 1])
    model.reset_classifier(3)
    assert model(x).shape == (2, 3)
    model.reset_classifier(0)
    assert model(x).shape == (2, model.num_features)


def test_in_chans_dropout_and_train_step():
    for arch, default_dropout in (("resnet50", 0.0), ("mobilenet_v2", 0.2), ("mobilenet_v1", 0.001)):
        with torch.device("meta"):
            model = build(arch, 0)
        assert model.drop_rate == default_dropout
    model = mobilenet_v1(0, in_chans=1, num_classes=2, drop_rate=0.3)
    assert model.features[0][0].in_channels == 1 and model.classifier[0].p == 0.3
    loss = model(torch.randn(2, 1, 32, 32)).sum()
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    with torch.device("meta"):
        assert resnet50(0, in_chans=4).conv1.in_channels == 4
        assert mobilenet_v2(0, in_chans=1).features[0][0].in_channels == 1


def test_build_dispatches_every_arch_and_efficientnet_is_unchanged():
    with torch.device("meta"):
        kinds = {arch: type(build(arch, 0)) for arch in ("efficientnet", *BASELINES)}
        ours, direct = build("efficientnet", "b1"), efficientnet("b1")
    assert kinds == {"efficientnet": EfficientNet, "resnet50": ResNet, "mobilenet_v2": MobileNetV2,
                     "mobilenet_v1": MobileNetV1}
    assert [(k, v.shape) for k, v in ours.state_dict().items()] == [(k, v.shape) for k, v in direct.state_dict().items()]
    drop_path = [s.p for s in ours.modules() if type(s).__name__ == "StochasticDepth"]
    assert max(drop_path) == pytest.approx(0.2 * 22 / 23)


def test_one_compound_rule_for_every_arch():
    for arch in ("efficientnet", *BASELINES):
        a, b, g = BASES.get(arch, (1.2, 1.1, 1.15))
        for phi in (0.0, 0.7, 3.0):
            s = resolve(phi, scaling="compound", arch=arch)
            assert (s.depth, s.width) == pytest.approx((a**phi, b**phi))
            assert s.resolution == round(224 * g**phi)
            assert tuple(compound(phi, a, b, g)) == pytest.approx((a**phi, b**phi, g**phi))
    # Baselines have no published table: "official" is the compound rule too.
    assert resolve(1.5, arch="resnet50") == resolve(1.5, scaling="compound", arch="resnet50")
    custom = resolve(1, arch="mobilenet_v2", alpha=1.0, beta=1.0, gamma=2.0)
    assert (custom.depth, custom.width, custom.resolution) == (1.0, 1.0, 448)


def test_baseline_scaling_round_trips_and_drives_the_cost_model():
    s = resolve(1.5, arch="mobilenet_v2")
    assert type(s).from_dict(s.as_dict()) == s and s.as_dict()["arch"] == "mobilenet_v2"
    assert count_macs(s) == count_macs(1.5, arch="mobilenet_v2")
    assert count_params(s) == count_params(mobilenet_v2(1.5))
    assert s.label == "mobilenet_v2 phi=1.5" and resolve(1.5).label == "phi=1.5"


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: build("vgg16", 0), "arch='vgg16'.*resnet50"),
        (lambda: build("resnet50", "b0"), "published names are EfficientNet"),
        (lambda: build("mobilenet_v2", -1), "phi=-1.*mobilenet_v2"),
        (lambda: build("mobilenet_v2", float("nan")), "phi=nan"),
        (lambda: build("resnet50", True), "phi=True"),
        (lambda: build("resnet50", 0, drop_path_rate=0.1), "stochastic depth"),
        (lambda: build("resnet50", 0, same_padding=True), "same_padding"),
        (lambda: mobilenet_v1(0, drop_path_rate=0.1), "stochastic depth"),
        (lambda: build("resnet50", 1, alpha=0.5), "alpha=0.5"),
        (lambda: build("resnet50", 1, scaling="linear"), "scaling='linear'"),
        (lambda: build("efficientnet", resolve(1, arch="resnet50")), "arch='efficientnet'.*resnet50"),
        (lambda: ResNet(resolve(0)), "arch='resnet50'"),
        (lambda: EfficientNet(resolve(0, arch="mobilenet_v2")), "EfficientNet needs.*arch='efficientnet'"),
        (lambda: MobileNetV1(resolve(0, arch="mobilenet_v2")), "arch='mobilenet_v1'"),
        (lambda: resolve(0, arch="resnet50").stages, "arch='resnet50'"),
    ],
)
def test_bad_arguments_raise_clear_errors(call, match):
    with torch.device("meta"), pytest.raises(ValueError, match=match):
        call()
