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
from effsk.training.optim import build_optimizer, build_scheduler, parameter_groups
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
