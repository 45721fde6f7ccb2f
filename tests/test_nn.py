"""effsk.nn against torchvision's EfficientNet (built here, in the test) and REFERENCE.md."""

import pytest
from synthetic import randomise_batchnorm
import torch
import torch.nn.functional as F
import torchvision.models as tvm
from torch import nn

from effsk.nn import Conv2dSame, efficientnet
from effsk.nn.cost import count_params

LITE_PARAMS = {"lite0": 4_652_008, "lite1": 5_416_680, "lite2": 6_092_072, "lite3": 8_197_096, "lite4": 13_006_568}
TV_EPS = {**{k: 1e-5 for k in range(5)}, **{k: 1e-3 for k in range(5, 8)}}


def _parity(k, size):
    g = torch.Generator().manual_seed(k)
    tv = getattr(tvm, f"efficientnet_b{k}")().eval()
    with torch.no_grad():
        randomise_batchnorm(tv, g)
    ours = efficientnet(f"b{k}").eval()
    tv_sd, our_sd = tv.state_dict(), ours.state_dict()
    assert list(our_sd) == list(tv_sd)
    assert all(our_sd[key].shape == tv_sd[key].shape for key in tv_sd)
    ours.load_state_dict(tv_sd)
    x = torch.randn(2, 3, size, size, generator=g)
    with torch.no_grad():
        return (ours(x) - tv(x)).abs().max().item(), tv, ours


@pytest.mark.parametrize("k", range(8))
def test_matches_torchvision_keys_params_eps_and_logits(k):
    diff, tv, ours = _parity(k, 64)
    assert diff < 1e-4
    assert count_params(f"b{k}") == sum(p.numel() for p in tv.parameters())
    eps = {m.eps for m in ours.modules() if isinstance(m, nn.BatchNorm2d)}
    tv_eps = {m.eps for m in tv.modules() if isinstance(m, nn.BatchNorm2d)}
    assert eps == tv_eps == {TV_EPS[k]}


def test_b0_matches_torchvision_at_224():
    diff, _, _ = _parity(0, 224)
    assert diff < 1e-4


def test_seeded_build_initialises_like_torchvision():
    # Same modules in the same order, initialised by torchvision's scheme: a seed gives the same weights.
    torch.manual_seed(0)
    ours = efficientnet("b0")
    torch.manual_seed(0)
    tv = tvm.efficientnet_b0()
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), tv.state_dict().values(), strict=True))


def test_stochastic_depth_schedule_matches_torchvision():
    tv = tvm.efficientnet_b3(stochastic_depth_prob=0.2)
    ours = efficientnet("b3", drop_path_rate=0.2)
    rates = lambda m: [s.p for s in m.modules() if type(s).__name__ == "StochasticDepth"]  # noqa: E731
    assert rates(ours) == pytest.approx(rates(tv))
    assert all(s.mode == "row" for s in ours.modules() if type(s).__name__ == "StochasticDepth")


@pytest.mark.parametrize("name", list(LITE_PARAMS))
def test_lite_parameter_counts_match_reference(name):
    assert count_params(name) == LITE_PARAMS[name]


def test_lite_structure_has_no_squeeze_excite_and_relu6():
    model = efficientnet("lite0", same_padding=True)
    kinds = {type(m).__name__ for m in model.modules()}
    assert "SqueezeExcitation" not in kinds and "SiLU" not in kinds and "ReLU6" in kinds
    assert all(isinstance(m, Conv2dSame) for m in model.modules() if isinstance(m, nn.Conv2d))


def test_same_padding_matches_tensorflow_formula():
    # TF "SAME": out = ceil(in / stride); pad_total = max((out - 1) * stride + k - in, 0), extra at the end.
    torch.manual_seed(0)
    for size, k, stride in [(7, 3, 2), (8, 3, 2), (9, 5, 2), (10, 5, 1), (224, 3, 2)]:
        conv = Conv2dSame(3, 4, k, stride=stride, bias=False)
        x = torch.randn(1, 3, size, size)
        out_size = -(-size // stride)
        total = max((out_size - 1) * stride + k - size, 0)
        ref = F.conv2d(F.pad(x, (total // 2, total - total // 2) * 2), conv.weight, stride=stride)
        y = conv(x)
        assert y.shape[-1] == out_size
        torch.testing.assert_close(y, ref)


def test_model_api_features_head_intermediates_and_reset():
    model = efficientnet(0.5, num_classes=7).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        fmap = model.forward_features(x)
        assert fmap.shape == (2, model.num_features, 2, 2)
        pooled = model.forward_head(fmap, pre_logits=True)
        assert pooled.shape == (2, model.num_features)
        torch.testing.assert_close(pooled, fmap.mean((2, 3)))
        torch.testing.assert_close(model.forward_head(fmap), model(x))
        maps = model.forward_intermediates(x, [3, 1, 8])
    info = model.feature_info
    for idx, fm in zip([3, 1, 8], maps):
        assert fm.shape[1] == info[idx]["channels"]
        assert fm.shape[-1] == 64 // info[idx]["reduction"]
    assert [f["reduction"] for f in info] == [2, 2, 4, 8, 16, 16, 32, 32, 32]
    with pytest.raises(ValueError, match="0..8"):
        model.forward_intermediates(x, [9])
    model.reset_classifier(3)
    assert model(x).shape == (2, 3)
    model.reset_classifier(0)
    assert model(x).shape == (2, model.num_features)


def test_in_chans_and_dropout_override():
    model = efficientnet("b0", in_chans=1, drop_rate=0.1, num_classes=2)
    assert model.features[0][0].in_channels == 1
    assert model.classifier[0].p == 0.1
    assert efficientnet("b5").classifier[0].p == 0.4
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 2)


def test_initialisation_follows_torchvision_scheme():
    model = efficientnet("b0")
    fc = model.classifier[1]
    assert fc.weight.abs().max() <= 1 / 1000**0.5 and torch.all(fc.bias == 0)
    bn = model.features[0][1]
    assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)
    conv = model.features[8][0].weight  # 1x1, fan_out = 1280
    assert conv.std().item() == pytest.approx((2 / 1280) ** 0.5, rel=0.1)
