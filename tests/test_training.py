"""The training loop (effsk.training), optimisers and schedules (effsk.training.optim), train transforms
(effsk.data.transforms): checked against torch's own schedulers, the TF RMSProp formula, and recorded state."""

import io

import numpy as np
import pytest
import torch
from torch import nn
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR, StepLR
from torch.utils.data import DataLoader, TensorDataset

from effsk.data.transforms import AUGMENT_PRESETS, train_transform
from effsk.data.transforms import eval_transform
from effsk.training.optim import build_optimizer, build_scheduler, layerwise_lr_scale, parameter_groups
from effsk.data.preprocessing import Preprocessing
from effsk.training import Callback, TrainConfig, Trainer, apply_freeze, recalibrate_bn
from effsk.weights import build_model


class Tiny(nn.Module):
    """EfficientNet's layout in miniature: ``features`` (stem + 2 stages) and ``classifier``."""

    def __init__(self, classes=3):
        super().__init__()
        block = lambda i, o: nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU())  # noqa: E731
        self.features = nn.Sequential(block(3, 4), block(4, 4), block(4, 6))
        self.classifier = nn.Sequential(nn.Dropout(0.3), nn.Linear(6, classes))

    def forward(self, x):
        return self.classifier(self.features(x).mean(dim=(2, 3)))


def tiny_data(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 6, 6, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    x[torch.arange(n), y] += 1.5  # learnable: the class channel is brighter
    return x, y


def loader(x, y, batch_size=4, seed=0, shuffle=True):
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle, generator=torch.Generator().manual_seed(seed))


def cfg(**kw):
    base = dict(max_epochs=2, lr=0.05, device="cpu", seed=0, optimizer="sgd", weight_decay=0.0)
    return TrainConfig(**{**base, **kw})


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# -- schedules and optimisers ------------------------------------------------------------------------


def lrs(optimizer, scheduler, steps):
    out = []
    for _ in range(steps):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


def test_warmup_cosine_equals_torch_linear_then_cosine():
    steps_per_epoch, epochs, warmup = 5, 4, 0.6  # 3 warm-up steps of 20
    ours_opt = torch.optim.SGD(nn.Linear(2, 1).parameters(), lr=0.1)
    ours = build_scheduler(ours_opt, "cosine", steps_per_epoch=steps_per_epoch, epochs=epochs, warmup_epochs=warmup, min_lr=0.01)
    ref_opt = torch.optim.SGD(nn.Linear(2, 1).parameters(), lr=0.1)
    ref = SequentialLR(
        ref_opt,
        [LinearLR(ref_opt, start_factor=1 / 3, end_factor=1.0, total_iters=2), CosineAnnealingLR(ref_opt, T_max=17, eta_min=0.01)],
        milestones=[3],
    )
    assert lrs(ours_opt, ours, 20) == pytest.approx(lrs(ref_opt, ref, 20), rel=1e-9)


def test_step_schedule_is_paper_decay_every_2_4_epochs():
    ours_opt = torch.optim.SGD(nn.Linear(2, 1).parameters(), lr=0.016)
    ours = build_scheduler(ours_opt, "step", steps_per_epoch=5, epochs=10, decay_epochs=2.4, decay_rate=0.97)
    ref_opt = torch.optim.SGD(nn.Linear(2, 1).parameters(), lr=0.016)
    ref = StepLR(ref_opt, step_size=12, gamma=0.97)  # 2.4 epochs x 5 steps
    assert lrs(ours_opt, ours, 50) == pytest.approx(lrs(ref_opt, ref, 50), rel=1e-9)


def test_rmsprop_follows_tf_formula():
    """TF RMSProp: ms starts at 1, eps inside the root, lr inside the momentum (REFERENCE.md's recipe)."""
    lr, rho, mom, eps, wd = 0.016, 0.9, 0.9, 1e-3, 1e-5
    p = nn.Parameter(torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64))
    opt = build_optimizer(nn.ParameterList([p]), "rmsprop", lr=lr, weight_decay=0.0, momentum=mom, rmsprop_decay=rho)
    opt.param_groups[0]["weight_decay"] = wd  # a 1-D parameter lands in the no-decay group; force L2 here
    grads = [np.array([0.1, -0.2, 0.0]), np.array([1e-4, 0.3, -0.5]), np.array([0.2, 0.2, 0.2])]
    ref_p, ms, buf = p.detach().numpy().copy(), np.ones(3), np.zeros(3)
    for g in grads:
        g_total = g + wd * ref_p
        ms = rho * ms + (1 - rho) * g_total**2
        buf = mom * buf + lr * g_total / np.sqrt(ms + eps)
        ref_p = ref_p - buf
        p.grad = torch.tensor(g)
        opt.step()
    np.testing.assert_allclose(p.detach().numpy(), ref_p, rtol=1e-12)


def test_weight_decay_spares_biases_and_norm_parameters():
    model = Tiny()
    groups = parameter_groups(model, 0.05)
    decayed = {id(p) for p in groups[0]["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in decayed) == (p.ndim > 1), name
    assert groups[0]["weight_decay"] == 0.05 and groups[1]["weight_decay"] == 0.0
    assert type(build_optimizer(model, "adamw")).__name__ == "AdamW"


def test_gradient_clipping_bounds_the_step():
    x, y = tiny_data(8)
    model = Tiny()
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    config = cfg(max_epochs=1, lr=1.0, momentum=0.0, schedule="constant", clip_grad_norm=1e-3)
    Trainer(model, loader(x, y, batch_size=8), None, config).fit()
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    # one SGD step of lr 1 on a clipped gradient moves the weights by exactly the clip norm
    assert (after - before).norm().item() == pytest.approx(1e-3, rel=1e-4)


# -- the loop ----------------------------------------------------------------------------------------


class Recorder(Callback):
    def __init__(self):
        self.params, self.epoch_states, self.events = [], [], []

    def on_fit_start(self, trainer):
        self.events.append("fit_start")

    def on_step_end(self, trainer, loss):
        self.params.append([p.detach().clone() for p in trainer.module.parameters()])

    def on_epoch_end(self, trainer, record):
        self.events.append(f"epoch_end {trainer.epoch}")
        self.epoch_states.append(snapshot(trainer.evaluated_module))


def test_learns_and_records_history():
    x, y = tiny_data(48)
    rec = Recorder()
    history = Trainer(Tiny(), loader(x, y, 8), loader(x, y, 8, shuffle=False), cfg(max_epochs=6), callbacks=[rec]).fit()
    assert [h["epoch"] for h in history] == list(range(6))
    assert {"train_loss", "val_loss", "val_score", "lr", "seconds", "images_per_second"} <= set(history[0])
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["val_score"] > 0.6  # chance is 1/3
    assert rec.events == ["fit_start"] + [f"epoch_end {e}" for e in range(1, 7)]


def test_ema_is_the_exponential_average_of_the_weights():
    x, y = tiny_data(12)
    model, rec, decay = Tiny(), Recorder(), 0.6
    start = [p.detach().clone() for p in model.parameters()]
    Trainer(model, loader(x, y), None, cfg(max_epochs=1, ema_decay=decay), callbacks=[rec]).fit()
    # torch's AveragedModel copies the weights at its first update, then averages
    expected = [s.clone() for s in rec.params[0]]
    for step in rec.params[1:]:
        expected = [decay * e + (1 - decay) * p for e, p in zip(expected, step)]
    assert start and all(not torch.equal(s, p) for s, p in zip(start, rec.params[-1]) if s.ndim > 1)
    for e, p in zip(expected, model.parameters()):  # the model ends with the EMA weights
        torch.testing.assert_close(p.detach(), e)


class ScriptedScore:
    def __init__(self, scores):
        self.scores = list(scores)

    def __call__(self, outputs, targets):
        return self.scores.pop(0)


def test_early_stopping_restores_best_weights():
    x, y = tiny_data(12)
    rec = Recorder()
    config = cfg(max_epochs=10, early_stopping=True, patience=2, monitor="val_score")
    trainer = Trainer(Tiny(), loader(x, y), loader(x, y, shuffle=False), config, metric_fn=ScriptedScore([0.1, 0.5, 0.3, 0.2, 0.9]), callbacks=[rec])
    history = trainer.fit()
    assert len(history) == 4 and trainer.best_epoch == 1
    for key, value in trainer.module.state_dict().items():
        torch.testing.assert_close(value, rec.epoch_states[1][key], rtol=0, atol=0)
    assert not torch.equal(rec.epoch_states[1]["classifier.1.weight"], rec.epoch_states[3]["classifier.1.weight"])


class Interrupt(Exception):
    pass


class CheckpointAndDie(Callback):
    """Saves the training state after ``at_step`` optimiser steps, then 'kills' the run."""

    def __init__(self, at_step):
        self.at_step, self.saved = at_step, None

    def on_step_end(self, trainer, loss):
        if trainer.step == self.at_step:
            buffer = io.BytesIO()
            torch.save(trainer.state_dict(), buffer)
            self.saved = buffer.getvalue()
            raise Interrupt


@pytest.mark.parametrize("at_step", [6, 8])  # after epoch 0's last step; mid-epoch 1
def test_resume_from_state_equals_uninterrupted_run(at_step):
    x, y = tiny_data(24)  # 6 batches of 4 per epoch
    config = cfg(max_epochs=3, ema_decay=0.5, schedule="cosine", warmup_epochs=0.5, optimizer="adamw")

    def fresh():
        torch.manual_seed(1)
        return Tiny()

    torch.manual_seed(5)
    straight = Trainer(fresh(), loader(x, y), loader(x, y, shuffle=False), config)
    torch.manual_seed(5)
    straight.fit()

    killer = CheckpointAndDie(at_step)
    torch.manual_seed(5)
    first = Trainer(fresh(), loader(x, y), loader(x, y, shuffle=False), config, callbacks=[killer])
    torch.manual_seed(5)
    with pytest.raises(Interrupt):
        first.fit()
    torch.manual_seed(123)  # the resumed process starts with another RNG state
    resumed = Trainer(fresh(), loader(x, y, seed=99), loader(x, y, shuffle=False), config)
    resumed.load_state_dict(torch.load(io.BytesIO(killer.saved), weights_only=True))
    resumed.fit()

    assert resumed.step == straight.step == 18
    assert [h["epoch"] for h in resumed.history] == [0, 1, 2]
    for key, value in straight.module.state_dict().items():
        torch.testing.assert_close(resumed.module.state_dict()[key], value, rtol=0, atol=0)
    assert resumed.history[-1]["train_loss"] == pytest.approx(straight.history[-1]["train_loss"], rel=1e-6)


def test_oom_names_batch_size_and_remedies(monkeypatch):
    x, y = tiny_data(8)
    model = Tiny()

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(model, "forward", out_of_memory)
    with pytest.raises(torch.cuda.OutOfMemoryError, match=r"batch_size=4") as info:
        Trainer(model, loader(x, y), None, cfg()).fit()
    assert "precision" in str(info.value) and "freeze" in str(info.value)


def test_verbose_shows_progress_and_epoch_lines(capsys):
    x, y = tiny_data(8)
    Trainer(Tiny(), loader(x, y), loader(x, y), cfg(verbose=0)).fit()
    quiet = capsys.readouterr()
    Trainer(Tiny(), loader(x, y), loader(x, y), cfg(verbose=1)).fit()
    loud = capsys.readouterr()
    assert "epoch" not in quiet.out + quiet.err
    assert "epoch 2/2" in loud.out and "val_loss" in loud.out
    assert "it/s" in loud.err or "s/it" in loud.err  # tqdm's bar


def test_divergence_is_reported():
    x, y = tiny_data(8)
    x[0] = float("nan")
    with pytest.raises(FloatingPointError, match="diverged"):
        Trainer(Tiny(), loader(x, y), None, cfg(max_epochs=1)).fit()


def test_precise_bn_is_the_exact_average_and_spares_frozen_layers():
    model = Tiny()
    x = torch.randn(16, 3, 6, 6) * 3 + 2
    frozen_before = snapshot(model.features[0])
    recalibrate_bn(model, DataLoader(TensorDataset(x), batch_size=4), batches=4, frozen=["features.0"])
    with torch.no_grad():
        h = model.features[0].eval()(x)  # as during recalibration: the frozen stem in eval mode
        conv_out = model.features[1][0](h)
    bn = model.features[1][1]
    torch.testing.assert_close(bn.running_mean, conv_out.mean(dim=(0, 2, 3)))
    # exact average of per-batch unbiased variances
    batch_vars = torch.stack([c.var(dim=(0, 2, 3), unbiased=True) for c in conv_out.split(4)])
    torch.testing.assert_close(bn.running_var, batch_vars.mean(0))
    for key, value in model.features[0].state_dict().items():
        assert torch.equal(value, frozen_before[key]), key


# -- freezing on the real network ---------------------------------------------------------------------


def _bn_buffers(model):
    return {k: v for k, v in model.state_dict().items() if "running_" in k or "num_batches" in k}


@pytest.mark.parametrize("freeze", ["none", "backbone", 2, "bn"])
def test_freeze_modes_change_exactly_the_intended_tensors(freeze):
    torch.manual_seed(0)
    model, _ = build_model("b0", None, num_classes=3, drop_path_rate=0.0)
    x = torch.randn(8, 3, 32, 32)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    recalibrate_bn(model, [(x,)], batches=1)  # BatchNorm statistics that fit the data, as loaded weights have
    model.eval()
    before = snapshot(model)
    config = cfg(max_epochs=1, optimizer="adamw", lr=1e-2, weight_decay=0.01, freeze=freeze)
    Trainer(model, loader(x, y, batch_size=4), None, config).fit()
    after = model.state_dict()

    def frozen_param(key):
        if freeze == "backbone":
            return not key.startswith("classifier.")
        if freeze == 2:
            return key.startswith(("features.0.", "features.1.", "features.2."))
        return False

    for key, _ in model.named_parameters():
        changed = not torch.equal(before[key], after[key])
        assert changed != frozen_param(key), key
    stats_frozen = freeze == "bn" or freeze == "backbone"
    for key in _bn_buffers(model):
        held = stats_frozen or (freeze == 2 and frozen_param(key))
        changed = not torch.equal(before[key], after[key])
        assert changed != held, key


def test_freeze_rejects_bad_modes():
    with pytest.raises(ValueError, match="freeze"):
        apply_freeze(Tiny(), "head")
    with pytest.raises(ValueError, match="out of range"):
        apply_freeze(Tiny(), 2)  # Tiny has a stem and 2 stages: k <= 1
    headless = Tiny()
    headless.classifier = nn.Identity()
    with pytest.raises(ValueError, match="no trainable"):
        Trainer(headless, [(torch.zeros(2, 3, 2, 2), torch.zeros(2))], None, cfg(freeze="backbone"))


# -- train-time transforms ------------------------------------------------------------------------------


def test_augment_presets_shape_dtype_and_seeding():
    pre = Preprocessing(crop_size=32, resize_size=36)
    image = torch.randint(0, 256, (3, 48, 40), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(train_transform(pre, "none")(image), eval_transform(pre)(image))
    for preset in AUGMENT_PRESETS[1:]:
        t = train_transform(pre, preset)
        torch.manual_seed(3)
        a = t(image)
        torch.manual_seed(3)
        b = t(image)
        c = t(image)
        assert a.shape == (3, 32, 32) and a.dtype == torch.float32
        assert torch.equal(a, b) and not torch.equal(a, c), preset
        assert torch.isfinite(a).all()
    with pytest.raises(ValueError, match="augment"):
        train_transform(pre, "heavy")


# -- progress lines of a multi-phase run ---------------------------------------------------------------


def test_epoch_lines_count_over_the_phases_of_a_run(capsys):
    x, y = tiny_data(8)
    Trainer(Tiny(), loader(x, y), None, cfg(max_epochs=2, verbose=1, epoch_offset=1, total_epochs=4, phase="train")).fit()
    out = capsys.readouterr().out
    assert "epoch 2/4 (train)" in out and "epoch 3/4 (train)" in out and "epoch 1/" not in out


def test_two_phase_fine_tune_numbers_epochs_overall(capsys):
    """Pretrained weights: a head phase then a train phase, each its own Trainer run; the epoch
    lines count 1/2 then 2/2 with the phase, not "epoch 1/1" twice."""
    from effsk import EfficientNetClassifier

    rng = np.random.default_rng(0)
    y = np.arange(16) % 2
    X = (rng.integers(0, 80, (16, 32, 32, 3)) + 150 * y[:, None, None, None]).astype(np.uint8)
    clf = EfficientNetClassifier("lite0", weights="imagenet", resolution=32, max_epochs=2, batch_size=8,
                                 early_stopping=False, augment="none", device="cpu", random_state=0, verbose=1)
    clf.fit(X, y)
    out = capsys.readouterr().out
    assert [r["phase"] for r in clf.history_] == ["head", "train"]
    assert "epoch 1/2 (head)" in out and "epoch 2/2 (train)" in out
    assert "epoch 1/1" not in out


# -- fast paths: precise BN on the fly, the head on features, channels_last, batched transforms ----------


def with_reduction(model, reduction):
    """``model`` declaring (timm's ``feature_info``) that its deepest map is its input / ``reduction``."""
    model.feature_info = [{"reduction": reduction}]
    return model


@pytest.mark.parametrize("precise_bn_batches, averaged_images", [(2, 256), (64, 8)])
def test_precise_bn_averages_the_epochs_last_training_batches_when_they_are_large(monkeypatch, precise_bn_batches, averaged_images):
    """Batches of 4 images x 36 positions (>= AVERAGED_BN_VALUES): with the weights held (lr 0), the
    statistics the loop leaves are the exact average of the epoch's last 2 batches' statistics (the
    last ``precise_bn_batches``, at most AVERAGED_BN_IMAGES images), as recalibrating on those batches
    computes them, and no extra pass runs."""
    import effsk.training.loop as loop_module

    monkeypatch.setattr(loop_module, "AVERAGED_BN_IMAGES", averaged_images)
    x, y = tiny_data(24)  # 6 batches of 4
    torch.manual_seed(0)
    model, reference = with_reduction(Tiny(), 1), Tiny()
    reference.load_state_dict(model.state_dict())
    calls = []
    model.features.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    config = cfg(max_epochs=1, lr=0.0, schedule="constant", precise_bn_batches=precise_bn_batches)
    Trainer(model, loader(x, y), loader(x, y, shuffle=False), config).fit()
    batches = list(loader(x, y, seed=config.seed))  # the epoch's order: the loop reseeds with seed + epoch
    recalibrate_bn(reference, batches[-2:], batches=2)
    for key, value in reference.state_dict().items():
        if "running_" in key:
            torch.testing.assert_close(model.state_dict()[key], value)
    assert model.features[0][1].momentum == 0.1  # restored after the epoch
    assert calls == [4] * 6 + [4] * 6  # the training batches, then validation: no precise-BN pass


def test_precise_bn_recomputes_on_joined_batches_when_they_are_small():
    """Batches of 4 images x 1 position: the statistics are recomputed over the training images
    joined (here all 24 in one pass: fewer than PRECISE_BN_VALUES), so they are the whole set's."""
    x, y = tiny_data(24)
    torch.manual_seed(0)
    model, reference = with_reduction(Tiny(), 32), Tiny()
    reference.load_state_dict(model.state_dict())
    Trainer(model, loader(x, y), None, cfg(max_epochs=1, lr=0.0, schedule="constant", precise_bn_batches=64)).fit()
    with torch.no_grad():
        stem = reference.features[0][0](x)  # the first BatchNorm's input over every training image
    torch.testing.assert_close(model.features[0][1].running_mean, stem.mean(dim=(0, 2, 3)))
    torch.testing.assert_close(model.features[0][1].running_var, stem.var(dim=(0, 2, 3), unbiased=True))


class TinyStaged(Tiny):
    """Tiny with timm's interface: forward_features / forward_head / get_classifier."""

    num_features = 6

    def forward_features(self, x):
        return self.features(x)

    def forward_head(self, x, pre_logits=False):
        pooled = x.mean(dim=(2, 3))
        return pooled if pre_logits else self.classifier(pooled)

    def get_classifier(self):
        return self.classifier[1]


def test_head_only_training_on_features_equals_training_with_a_frozen_backbone():
    from effsk.training.model_ops import BackboneFeatures

    x, y = tiny_data(24)
    torch.manual_seed(0)
    frozen = TinyStaged()
    on_features = TinyStaged()
    on_features.load_state_dict(frozen.state_dict())
    initial_head = frozen.classifier[1].weight.detach().clone()
    config = cfg(max_epochs=2, freeze="backbone", optimizer="adamw", lr=0.05)
    torch.manual_seed(1)
    Trainer(frozen, loader(x, y), loader(x, y, shuffle=False), config).fit()
    features, _ = BackboneFeatures(on_features, device="cpu").of_loader(loader(x, y, shuffle=False))
    torch.manual_seed(1)  # the same dropout masks
    trainer = Trainer(on_features, loader(features, y), loader(features, y, shuffle=False), config, head_only=True)
    trainer.fit()
    for key, value in frozen.state_dict().items():
        torch.testing.assert_close(on_features.state_dict()[key], value)
    assert not torch.equal(frozen.classifier[1].weight, initial_head)  # the head trained
    with pytest.raises(ValueError, match="freeze='backbone'"):
        Trainer(TinyStaged(), loader(features, y), None, cfg(), head_only=True)


def test_fit_computes_backbone_features_once_without_augmentation(monkeypatch):
    from effsk import EfficientNetClassifier
    from effsk.nn.staged import SequentialStagedModel

    rng = np.random.default_rng(0)
    y = np.arange(24) % 2
    X = (rng.integers(0, 80, (24, 32, 32, 3)) + 150 * y[:, None, None, None]).astype(np.uint8)
    seen = []
    real = SequentialStagedModel.forward_features
    monkeypatch.setattr(SequentialStagedModel, "forward_features", lambda self, x: seen.append((len(x), torch.is_grad_enabled())) or real(self, x))
    params = dict(weights=None, resolution=32, max_epochs=3, batch_size=8, validation_fraction=0.25, random_state=0)
    EfficientNetClassifier(freeze="backbone", augment="none", **params).fit(X, y)
    assert sum(n for n, _ in seen) == 24 and not any(grad for _, grad in seen)  # once per image, no autograd
    seen.clear()
    EfficientNetClassifier(freeze="backbone", augment="light", **params).fit(X, y)
    assert sum(n for n, _ in seen) == 6 + 3 * 18 and not any(grad for _, grad in seen)  # val once; train every epoch


@pytest.mark.parametrize("machine, expected", [("x86_64", True), ("AMD64", True), ("aarch64", False), ("arm64", False)])
def test_channels_last_where_it_trains_faster(monkeypatch, machine, expected):
    import platform

    from effsk.utils.runtime import prefers_channels_last

    monkeypatch.setattr(platform, "machine", lambda: machine)
    assert prefers_channels_last(torch.device("cpu")) is expected
    trainer = Trainer(Tiny(), [(torch.zeros(2, 3, 4, 4), torch.zeros(2, dtype=torch.long))], None, cfg())
    assert trainer.channels_last is expected
    assert trainer.module.features[0][0].weight.is_contiguous(memory_format=torch.channels_last) is expected
    assert Trainer(Tiny(), [(torch.zeros(2, 3, 4, 4), torch.zeros(2))], None, cfg(channels_last=False)).channels_last is False


def test_batched_eval_transform_equals_torchvision_image_by_image():
    from torchvision.transforms import InterpolationMode, v2

    pre = Preprocessing(crop_size=24, resize_size=28, interpolation="bicubic", mean=(0.5, 0.4, 0.3), std=(0.2, 0.3, 0.25))
    reference = v2.Compose([v2.Resize(28, interpolation=InterpolationMode.BICUBIC, antialias=True), v2.CenterCrop(24),
                            v2.ToDtype(torch.float32, scale=True), v2.Normalize(pre.mean, pre.std)])
    g = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g) for h, w in [(30, 40), (8, 8), (30, 40), (50, 29)]]
    expected = torch.stack([reference(image) for image in images])
    torch.testing.assert_close(eval_transform(pre).batch(images), expected, rtol=0, atol=0)
    torch.testing.assert_close(eval_transform(pre)(images[3]), expected[3], rtol=0, atol=0)


def test_loader_batches_small_images_and_reports_failures_in_place(monkeypatch):
    from effsk.data import images as images_module
    from effsk.data.images import make_loader

    pre = Preprocessing(crop_size=16, resize_size=18)
    rng = np.random.default_rng(0)
    X = [rng.integers(0, 256, (20, 20, 3), dtype=np.uint8), "missing.png", rng.integers(0, 256, (30, 20, 3), dtype=np.uint8),
         rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)]
    batched = list(make_loader(X, pre, batch_size=4, on_error="nan", return_errors=True))
    monkeypatch.setattr(images_module, "_BATCHED_PIXELS", 0)  # every image on its own
    one_by_one = list(make_loader(X, pre, batch_size=4, on_error="nan", return_errors=True))
    (images, index, errors), (expected, _, expected_errors) = batched[0], one_by_one[0]
    assert index.tolist() == [0, 1, 2, 3] and errors == expected_errors and [e[0] for e in errors] == [1]
    assert torch.isnan(images[1]).all() and not torch.isnan(images[[0, 2, 3]]).any()
    torch.testing.assert_close(images, expected, rtol=0, atol=0, equal_nan=True)
    reference = eval_transform(pre)
    torch.testing.assert_close(images[2], reference(torch.from_numpy(X[2]).permute(2, 0, 1)), rtol=0, atol=0)


def test_num_workers_auto_is_resolved_for_every_loader(monkeypatch):
    from effsk import EfficientNetClassifier
    from effsk.estimators import _base, _finetune

    asked = []

    def resolve(num_workers, device, **kwargs):
        asked.append(num_workers)
        return 0

    monkeypatch.setattr(_finetune, "resolve_num_workers", resolve)
    monkeypatch.setattr(_base, "resolve_num_workers", resolve)
    rng = np.random.default_rng(0)
    y = np.arange(8) % 2
    X = rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)
    clf = EfficientNetClassifier(weights=None, resolution=16, max_epochs=1, batch_size=4, early_stopping=False, random_state=0)
    assert clf.num_workers == "auto"
    clf.fit(X, y).predict(X)
    assert asked == ["auto", "auto"]  # fit's loaders, then prediction's


# -- a gentle unfreeze: per-group learning rates, warm-up, BatchNorm kept as loaded -------------------


class GroupLrs(Callback):
    """Each param group's learning rate after every step, keyed by the group's ``lr_scale``."""

    def __init__(self):
        self.lrs = []

    def on_step_end(self, trainer, loss):
        self.lrs.append({g["lr_scale"]: g["lr"] for g in trainer.optimizer.param_groups})


def test_backbone_group_trains_at_its_scale_and_warms_up_with_the_head():
    x, y = tiny_data(24)  # 3 batches of 8 per epoch
    model, rec = Tiny(), GroupLrs()
    config = cfg(max_epochs=3, lr=0.1, backbone_lr_scale=0.25, warmup_epochs=1, schedule="cosine", optimizer="adamw", weight_decay=0.01)
    trainer = Trainer(model, loader(x, y, batch_size=8), None, config, callbacks=[rec])
    head = {id(p) for p in model.classifier.parameters()}
    for group in trainer.optimizer.param_groups:
        assert all((id(p) in head) == (group["lr_scale"] == 1.0) for p in group["params"])
        assert group["weight_decay"] == (0.01 if group["params"][0].ndim > 1 else 0.0)
    assert sorted({g["lr_scale"] for g in trainer.optimizer.param_groups}) == [0.25, 1.0]
    trainer.fit()
    # reference: torch's own warm-up then cosine over an optimiser with the two rates set by hand
    ref_opt = torch.optim.SGD([{"params": [nn.Parameter(torch.zeros(1))], "lr": 0.1},
                               {"params": [nn.Parameter(torch.zeros(1))], "lr": 0.025}], lr=0.1)
    ref = SequentialLR(ref_opt, [LinearLR(ref_opt, start_factor=1 / 3, end_factor=1.0, total_iters=2),
                                 CosineAnnealingLR(ref_opt, T_max=6)], milestones=[3])
    expected = []
    for _ in range(9):
        ref_opt.step()
        ref.step()
        expected.append([g["lr"] for g in ref_opt.param_groups])
    np.testing.assert_allclose([[step[1.0], step[0.25]] for step in rec.lrs], expected, rtol=1e-9, atol=1e-15)
    assert trainer.history[0]["lr"] == pytest.approx(0.1)  # the record shows the head's rate


def test_layerwise_scale_decays_from_the_top_block_to_the_stem():
    scale = layerwise_lr_scale(Tiny(), backbone_scale=0.5, layer_decay=0.5)
    named = dict(Tiny().named_parameters())
    expected = {"classifier.1": 1.0, "features.2": 0.5, "features.1": 0.25, "features.0": 0.125}
    for name in named:
        prefix = name.rsplit(".", 2)[0] if name.startswith("features") else name.rsplit(".", 1)[0]
        assert scale(name) == expected[prefix], name
    groups = parameter_groups(Tiny(), 0.1, scale)
    assert [g["lr_scale"] for g in groups] == [1.0, 1.0, 0.5, 0.5, 0.25, 0.25, 0.125, 0.125]
    with pytest.raises(ValueError, match="layer_decay"):
        TrainConfig(layer_decay=0.0)


class PhaseStepLosses(Callback):
    def __init__(self, losses):
        self.losses = losses

    def on_step_end(self, trainer, loss):
        self.losses.setdefault(trainer.config.phase, []).append(loss.item())


def test_fine_tune_loss_does_not_rise_when_the_backbone_joins(monkeypatch):
    """Real Lite0 ImageNet weights on 192 digits: the first full-network epoch ends below the head
    epoch, and its first batches start no higher than the head's last ones. The old unfreeze (one
    rate for all, BatchNorm switched to batch statistics) rose by 0.2 in the epoch mean and by 0.7
    over those batches."""
    from effsk import EfficientNetClassifier
    from effsk.data import digits_rgb
    from effsk.estimators import _finetune

    losses = {}

    class Spy(_finetune.Trainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.callbacks.append(PhaseStepLosses(losses))

    monkeypatch.setattr(_finetune, "Trainer", Spy)
    X, y, _ = digits_rgb(size=64, n=192, margin=0)
    clf = EfficientNetClassifier("lite0", resolution=64, max_epochs=2, batch_size=16, early_stopping=False,
                                 device="cpu", random_state=0).fit(X, y)
    head, train = clf.history_
    assert (head["phase"], train["phase"]) == ("head", "train")
    assert train["train_loss"] < head["train_loss"] - 0.2  # measured: 1.84 -> 1.31
    assert np.mean(losses["train"][:3]) < np.mean(losses["head"][-3:]) + 0.2  # measured: 1.55 -> 1.42
