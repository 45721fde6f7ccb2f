"""optimize_for_inference against torchvision's EfficientNet (built here) and the unoptimised model."""

import pickle
import warnings

import pytest
from synthetic import randomise_batchnorm
import torch
import torchvision.models as tvm
from torch import nn

from effsk.nn import EfficientNet, efficientnet
from effsk.nn.inference import CompiledOrEager, _CompiledStages, fold_batchnorm, optimize_for_inference

SIZE = 64


@pytest.fixture(scope="module")
def models():
    """torchvision's B0 with random BN statistics, and effsk's B0 holding the same weights."""
    g = torch.Generator().manual_seed(0)
    tv = tvm.efficientnet_b0().eval()
    randomise_batchnorm(tv, g, scale=0.5, var=(0.2, 2.2))
    ours = efficientnet("b0").eval()
    ours.load_state_dict(tv.state_dict())
    x = torch.randn(3, 3, SIZE, SIZE, generator=g)
    with torch.inference_mode():
        tv_features = tv.features(x)
    return tv, ours, x, tv_features


def _close(got, expected, tol):
    scale = expected.abs().max().item()
    assert scale > 1e-2, "reference features are degenerate; the comparison would prove nothing"
    return (got.float() - expected).abs().max().item() <= tol * scale


@pytest.mark.parametrize("channels_last", [False, True])
def test_folded_features_match_torchvision(models, channels_last):
    tv, ours, x, expected = models
    fast = optimize_for_inference(ours, device="cpu", channels_last=channels_last)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in ours.modules())
    assert sum(isinstance(m, nn.Identity) for m in fast.features.modules()) == n_bn
    with torch.inference_mode():
        got = fast.forward_features(x)
    assert got.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert _close(got, expected, 1e-4)


def test_interface_preserved(models):
    tv, ours, x, _ = models
    fast = optimize_for_inference(ours, device="cpu")
    assert isinstance(fast, EfficientNet)
    assert fast.feature_info == ours.feature_info and fast.num_features == ours.num_features
    assert not fast.training and not any(p.requires_grad for p in fast.parameters())
    with torch.inference_mode():
        indices = [2, 4, len(tv.features) - 1]
        got = fast.forward_intermediates(x, indices)
        stages = [tv.features[: i + 1](x) for i in indices]
        for g, e in zip(got, stages):
            assert _close(g, e, 1e-4)
        pooled = fast.forward_head(fast.forward_features(x), pre_logits=True)
        assert _close(pooled, torch.flatten(tv.avgpool(stages[-1]), 1), 1e-4)
        assert _close(fast(x), tv(x), 1e-4)


def test_original_model_untouched(models):
    _, ours, x, _ = models
    model = efficientnet(0.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimize_for_inference(model.eval(), device="cpu", dtype=torch.bfloat16)
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert all(p.dtype == torch.float32 and p.requires_grad for p in model.parameters())


def test_bf16_weights_accept_fp32_input(models):
    _, ours, x, expected = models
    fast = optimize_for_inference(ours, device="cpu", dtype=torch.bfloat16)
    assert {p.dtype for p in fast.parameters()} == {torch.bfloat16}
    with torch.inference_mode():
        got = fast.forward_features(x)  # float32 NCHW in; the model converts it on entry
    assert got.dtype == torch.bfloat16
    assert _close(got, expected, 3e-2)


def test_fold_batchnorm_leaves_unpaired_and_training_alone():
    net = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 1), nn.ReLU(), nn.BatchNorm2d(4))
    fold_batchnorm(net.eval())
    assert [type(m) for m in net] == [nn.BatchNorm2d, nn.Conv2d, nn.ReLU, nn.BatchNorm2d]
    with pytest.raises(ValueError, match="eval"):
        fold_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)))


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(backend="jit"), "backend='jit'"), (dict(dtype=torch.int8), "dtype"), (dict(device="tpu9"), "device")],
)
def test_bad_arguments_name_the_problem(kwargs, match):
    with pytest.raises(ValueError, match=match):
        optimize_for_inference(efficientnet(0.0).eval(), **{"device": "cpu", **kwargs})


def test_compile_backend_falls_back_to_eager_when_compilation_fails(models, monkeypatch):
    _, ours, x, expected = models
    fast = optimize_for_inference(ours, device="cpu", backend="compile")
    assert isinstance(fast.features, _CompiledStages) and len(fast.features) == len(ours.features)

    def broken_compile(*args, **kwargs):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(torch, "compile", broken_compile)
    with torch.inference_mode():
        with pytest.warns(RuntimeWarning, match="no C.. compiler found"):
            first = fast.forward_features(x)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # warned once; later calls run eagerly in silence
            second = fast.forward_features(x)
    assert _close(first, expected, 1e-4) and torch.equal(first, second)


def test_compile_backend_intermediates_run_the_eager_stages(models, monkeypatch):
    tv, ours, x, _ = models
    fast = optimize_for_inference(ours, device="cpu", backend="compile")
    monkeypatch.setattr(torch, "compile", lambda *a, **k: pytest.fail("forward_intermediates compiled"))
    with torch.inference_mode():
        got = fast.forward_intermediates(x, [4, 1])
        for g, i in zip(got, [4, 1]):
            assert _close(g, tv.features[: i + 1](x), 1e-4)
    assert type(fast.features[:2]) is nn.Sequential


def test_compile_backend_reports_bad_input_not_compiler(models, monkeypatch):
    _, ours, _, _ = models
    fast = optimize_for_inference(ours, device="cpu", backend="compile")

    def compiled_that_fails(x):
        raise RuntimeError("compiler blew up")

    monkeypatch.setattr(torch, "compile", lambda function, **options: compiled_that_fails)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="expected input.*3 channels"):
        fast.forward_features(torch.randn(1, 5, SIZE, SIZE))
    assert not fast.features._runner.failed


def test_optimised_copy_pickles(models):
    _, ours, x, _ = models
    fast = optimize_for_inference(ours, device="cpu", backend="compile")
    fast.features._runner = CompiledOrEager(fast.features._eager)
    fast.features._runner.compiled = object()  # stands in for a compiled callable, which does not pickle
    restored = pickle.loads(pickle.dumps(fast))
    runner = restored.features._runner
    assert runner.compiled is None and runner.function.__self__ is restored.features  # rebound to the copy
    with torch.inference_mode():
        assert torch.equal(restored.features[0](x), fast.features[0](x))
