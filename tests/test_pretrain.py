"""effsk.pretrain / `effsk pretrain`: recipes, an end-to-end run checked against torchvision, resume
after SIGKILL, and data-parallel training under torchrun (2 CPU processes, gloo)."""

import contextlib
import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
import torchvision
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import InterpolationMode, v2

from effsk import cli
from effsk.weights.checkpoint import load_checkpoint
from effsk.training.distributed import ResumableDistributedSampler, ShardSampler
from effsk.training.pretraining import CHECKPOINT_FILE, RECIPES, STATE_FILE, Recipe, get_recipe, load_images, pretrain
from effsk.training import Callback, TrainConfig, Trainer
from effsk.weights import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = 6
# b0 at 32 px: the smallest published variant, at a resolution where a step takes ~0.1 s on one core
TINY = ["--phi", "b0", "--resolution", "32", "--num-workers", "0", "--quiet"]


def write_folder(root, per_class, seed):
    """An ImageFolder of 32x32 PNGs whose class shows as a tint (k % 3) and, for k >= 3, a band."""
    rng = np.random.default_rng(seed)
    for k in range(CLASSES):
        os.makedirs(root / f"class{k}", exist_ok=True)
        for i in range(per_class):
            a = rng.integers(0, 90, (32, 32, 3))
            a[..., k % 3] += 110
            if k >= 3:
                a[10:22] += 100
            Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(root / f"class{k}" / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    base = tmp_path_factory.mktemp("pretrain_data")
    return write_folder(base / "train", 8, seed=0), write_folder(base / "val", 2, seed=1)


@contextlib.contextmanager
def threads(n):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def records(output_dir):
    with open(os.path.join(output_dir, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh]


def weights_of(path):
    return load_checkpoint(path)["state_dict"]


# -- recipes -----------------------------------------------------------------------------------------


def test_paper_recipe_is_reference_md():
    paper = RECIPES["paper"]
    config = paper.train_config(lr=paper.lr_for(4096))
    assert config.lr == pytest.approx(0.256)  # 0.016 per 256 images
    assert (config.optimizer, config.rmsprop_decay, config.momentum, config.eps) == ("rmsprop", 0.9, 0.9, 1e-3)
    assert (config.schedule, config.decay_rate, config.decay_epochs, config.warmup_epochs) == ("step", 0.97, 2.4, 5)
    assert (config.weight_decay, config.label_smoothing, config.ema_decay) == (1e-5, 0.1, 0.9999)
    assert (paper.augment, paper.drop_path_rate, paper.drop_rate) == ("autoaugment", 0.2, None)
    assert (paper.bn_momentum, paper.bn_eps) == (0.01, 1e-3)  # TF decay 0.99
    modern = RECIPES["modern"]
    assert (modern.optimizer, modern.schedule, modern.augment, modern.label_smoothing) == ("adamw", "cosine", "randaugment", 0.1)
    assert modern.ema_decay is not None


def test_every_recipe_value_can_be_overridden_and_typos_are_named():
    changed = get_recipe("paper", optimizer="sgd", ema_decay=None, warmup_epochs=0, precise_bn_batches=4)
    assert (changed.optimizer, changed.ema_decay, changed.warmup_epochs, changed.precise_bn_batches) == ("sgd", None, 0, 4)
    assert changed.train_config(lr=0.1).optimizer == "sgd"
    with pytest.raises(TypeError, match="warmup_epoch.*valid settings"):
        get_recipe("paper", warmup_epoch=1)
    with pytest.raises(ValueError, match="'augment' parameter of get_recipe must be a str among .*Got 'mixup'"):
        get_recipe("modern", augment="mixup")
    with pytest.raises(ValueError, match="optimizer="):
        get_recipe("modern", optimizer="lamb")
    assert set(Recipe.names()) >= {"lr_per_256", "bn_eps", "freeze", "early_stopping"}


def test_ema_warmup_follows_tf_num_updates_ramp():
    """TF ExponentialMovingAverage(decay, num_updates): decay_n = min(decay, (1 + n) / (10 + n))."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 3, generator=g), torch.randint(0, 2, (16,), generator=g)
    loader = DataLoader(list(zip(x, y)), batch_size=4)
    model, snapshots = nn.Linear(3, 2), []

    class Snap(Callback):
        def on_step_end(self, trainer, loss):
            snapshots.append([p.detach().clone() for p in trainer.module.parameters()])

    config = TrainConfig(max_epochs=1, lr=0.1, optimizer="sgd", device="cpu", ema_decay=0.5, ema_warmup=True)
    Trainer(model, loader, None, config, callbacks=[Snap()]).fit()
    expected = snapshots[0]
    for n, params in enumerate(snapshots[1:], start=1):
        d = min(0.5, (1 + n) / (10 + n))
        expected = [d * e + (1 - d) * p for e, p in zip(expected, params)]
    for e, p in zip(expected, model.parameters()):
        torch.testing.assert_close(p.detach(), e)


# -- samplers and mid-epoch skipping ------------------------------------------------------------------


def test_rank_batches_together_equal_the_single_process_batch():
    n, world, per_rank = 22, 2, 3
    single = list(ResumableDistributedSampler(range(n), num_replicas=1, rank=0, seed=3))
    shards = [list(ResumableDistributedSampler(range(n), num_replicas=world, rank=r, seed=3)) for r in range(world)]
    steps = len(shards[0]) // per_rank
    for k in range(steps):
        together = sorted(i for shard in shards for i in shard[k * per_rank:(k + 1) * per_rank])
        assert together == sorted(single[k * per_rank * world:(k + 1) * per_rank * world])
    evaluated = sorted(i for r in range(3) for i in ShardSampler(n, 3, r))
    assert evaluated == list(range(n)) and sum(len(ShardSampler(n, 3, r)) for r in range(3)) == n


class CountingDataset(Dataset):
    def __init__(self, x, y):
        self.x, self.y, self.loaded = x, y, 0

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        self.loaded += 1
        return self.x[i], self.y[i]


def test_mid_epoch_resume_skips_done_batches_without_loading_them():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(24, 3, generator=g), torch.randint(0, 2, (24,), generator=g)
    config = TrainConfig(max_epochs=2, lr=0.05, optimizer="adamw", device="cpu", seed=0, ema_decay=0.5)

    def run(state=None, stop_at=None):
        data = CountingDataset(x, y)
        loader = DataLoader(data, batch_size=4, sampler=ResumableDistributedSampler(range(24), num_replicas=1, rank=0))
        torch.manual_seed(1)
        trainer = Trainer(nn.Linear(3, 2), loader, None, config)
        if state is not None:
            trainer.load_state_dict(state)
        saved = {}

        class Stop(Exception):
            pass

        class Kill(Callback):
            def on_step_end(self, t, loss):
                if t.step == stop_at:
                    saved["state"] = t.state_dict()
                    raise Stop

        trainer.callbacks.append(Kill())
        with contextlib.suppress(Stop):
            trainer.fit()
        return trainer, data, saved.get("state")

    straight, _, _ = run()
    _, _, state = run(stop_at=9)  # mid-epoch 1 (6 steps per epoch)
    resumed, data, _ = run(state=state)
    assert resumed.step == straight.step == 12
    assert data.loaded == 3 * 4  # only the 3 batches epoch 1 had left
    for a, b in zip(resumed.module.parameters(), straight.module.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# -- data sources ------------------------------------------------------------------------------------


def test_tables_and_folders_give_the_same_labelled_images(data, tmp_path):
    train, _ = data
    folder = load_images(train)
    table = pd.DataFrame({"file": [os.path.relpath(p, tmp_path) for p in folder.paths],
                          "kind": [folder.classes[i] for i in folder.labels]})
    table.to_csv(tmp_path / "images.csv", index=False)
    table.to_parquet(tmp_path / "images.parquet")
    for name in ("images.csv", "images.parquet"):
        loaded = load_images(tmp_path / name, path_column="file", label_column="kind")
        assert [os.path.normpath(p) for p in loaded.paths] == [os.path.normpath(p) for p in folder.paths]
        assert loaded.labels == folder.labels and loaded.classes == folder.classes
    with pytest.raises(FileNotFoundError, match="neither a directory"):
        load_images(tmp_path / "missing")


# -- end to end ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def paper_run(data, tmp_path_factory):
    train, val = data
    out = tmp_path_factory.mktemp("paper_run")
    with threads(1):
        result = pretrain(train, val_data=val, output_dir=out, phi="b0", recipe="paper", epochs=2, batch_size=8,
                          resolution=32, num_workers=0, verbose=0)
    return result, out


def torchvision_eval(checkpoint_path, val_root):
    """Top-1, top-5 and label-smoothed loss of the checkpoint's weights in torchvision's own
    efficientnet_b0, on torchvision's ImageFolder with the checkpoint's preprocessing."""
    ckpt = load_checkpoint(checkpoint_path)
    prep = ckpt["preprocessing"]
    model = torchvision.models.efficientnet_b0(num_classes=len(ckpt["classes"]))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eps = ckpt["arch"]["bn_eps"]
    model.load_state_dict(ckpt["state_dict"])
    transform = v2.Compose([
        v2.PILToTensor(),
        v2.Resize(prep["resize_size"], interpolation=InterpolationMode(prep["interpolation"]), antialias=True),
        v2.CenterCrop(prep["crop_size"]),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(prep["mean"], prep["std"]),
    ])
    folder = torchvision.datasets.ImageFolder(val_root, transform=transform)
    assert folder.classes == ckpt["classes"]
    x, y = zip(*folder)
    with torch.no_grad():
        logits = model.eval()(torch.stack(x))
    y = torch.tensor(y)
    top5 = (logits.topk(5, dim=1).indices == y[:, None]).any(1).float().mean().item()
    top1 = (logits.argmax(1) == y).float().mean().item()
    loss = nn.functional.cross_entropy(logits, y, label_smoothing=0.1).item()
    return top1, top5, loss


def test_pretrain_end_to_end_logs_metrics_and_writes_a_usable_checkpoint(paper_run, data):
    result, out = paper_run
    _, val = data
    steps_per_epoch = 48 // 8
    logged = records(out)
    assert [r["epoch"] for r in logged] == [0, 1] and [r["step"] for r in logged] == [6, 12]
    assert result.history == logged
    assert pd.read_csv(result.metrics)["val_top5"].tolist() == pytest.approx([r["val_top5"] for r in logged])
    # paper: lr 0.016 per 256 images, linear warm-up over 5 epochs; the record holds the epoch's last step
    base = 0.016 * 8 / 256
    assert [r["lr"] for r in logged] == pytest.approx([base * steps_per_epoch * (e + 1) / (5 * steps_per_epoch) for e in (0, 1)])
    assert all(r["images_per_second"] > 0 and np.isfinite(r["train_loss"]) for r in logged)
    with Image.open(result.plot) as png:
        assert png.format == "PNG" and png.size[0] > 100

    ckpt = load_checkpoint(result.checkpoint)
    assert ckpt["classes"] == [f"class{k}" for k in range(CLASSES)]
    assert ckpt["arch"]["bn_eps"] == 1e-3 and ckpt["preprocessing"]["crop_size"] == 32
    assert ckpt["metadata"]["pretrain"]["steps"] == 12
    top1, top5, loss = torchvision_eval(result.checkpoint, val)
    assert logged[-1]["val_top1"] == pytest.approx(top1, abs=1e-6)
    assert logged[-1]["val_top5"] == pytest.approx(top5, abs=1e-6)
    assert logged[-1]["val_loss"] == pytest.approx(loss, rel=1e-4)

    backbone, prep = build_model("b0", weights=result.checkpoint, num_classes=0)
    assert backbone.num_classes == 0 and prep.crop_size == 32
    full, _ = build_model(None, weights=result.checkpoint, num_classes=CLASSES)
    for key, value in ckpt["state_dict"].items():
        torch.testing.assert_close(full.state_dict()[key], value, rtol=0, atol=0)


def test_output_dir_is_protected_and_resume_checks_settings(paper_run, data):
    result, out = paper_run
    train, val = data
    common = dict(val_data=val, output_dir=out, phi="b0", recipe="paper", epochs=2, batch_size=8, resolution=32,
                  num_workers=0, verbose=0)
    with pytest.raises(FileExistsError, match="resume=True"):
        pretrain(train, **common)
    with pytest.raises(ValueError, match=r"lr: 0\.0005 -> 0\.001"):
        pretrain(train, **{**common, "resume": True}, lr=0.001)
    with pytest.raises(FileNotFoundError, match="no run to resume"):
        pretrain(train, **{**common, "output_dir": out / "elsewhere", "resume": True})


def test_continues_from_a_checkpoint_keeping_its_batchnorm_eps(paper_run, data, tmp_path):
    result, _ = paper_run
    train, _ = data
    start = weights_of(result.checkpoint)
    with threads(1):  # a vanishing lr and frozen BatchNorm: the run must end where it started
        cont = pretrain(train, output_dir=tmp_path, phi=None, weights=result.checkpoint, recipe="modern", epochs=1,
                        batch_size=8, lr=1e-12, resolution=32, num_workers=0, verbose=0, freeze="bn", ema_decay=None)
    ckpt = load_checkpoint(cont.checkpoint)
    assert ckpt["arch"]["bn_eps"] == 1e-3  # the modern recipe keeps the loaded weights' eps
    for key, value in start.items():
        torch.testing.assert_close(ckpt["state_dict"][key], value, rtol=0, atol=1e-8)
    with pytest.raises(ValueError, match="bn_eps"):
        pretrain(train, output_dir=tmp_path / "x", weights=result.checkpoint, bn_eps=1e-5)


def test_cli_reports_bad_settings(data, tmp_path, capsys):
    train, _ = data
    assert cli.main(["pretrain", str(train), "--output-dir", str(tmp_path), "--set", "warmup=3"]) == 2
    assert "warmup" in capsys.readouterr().err
    assert cli._parse_override("betas=(0.9, 0.99)") == ("betas", (0.9, 0.99))
    assert cli._parse_override("optimizer=sgd") == ("optimizer", "sgd")
    assert cli._parse_override("ema_decay=None") == ("ema_decay", None)


# -- resume after SIGKILL -----------------------------------------------------------------------------

# Runs `effsk pretrain` and SIGKILLs itself inside the state write of optimiser step KILL_AT: the
# temporary file is written, the previous state still in place (a kill at a known point, no race).
DIE_MID_WRITE = """
import os, signal, sys
from effsk import cli
from effsk.training import run_state

kill_at = int(sys.argv[1])
save_state = run_state.PretrainCallback.save_state

def save_state_then_die(self, trainer):
    if trainer.step == kill_at:
        os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)  # atomic_write fsyncs before os.replace
    save_state(self, trainer)

run_state.PretrainCallback.save_state = save_state_then_die
sys.exit(cli.main(["pretrain", *sys.argv[2:]]))
"""


def test_sigkill_mid_epoch_then_resume_equals_an_uninterrupted_run(data, tmp_path, capsys):
    train, _ = data
    args = [str(train), *TINY, "--epochs", "2", "--batch-size", "8", "--save-every-steps", "2",
            "--set", "warmup_epochs=0.5", "--set", "ema_decay=0.9"]  # 6 steps per epoch
    killed_dir, straight_dir = tmp_path / "killed", tmp_path / "straight"
    script = tmp_path / "die_mid_write.py"
    script.write_text(DIE_MID_WRITE)
    killed = subprocess.Popen([sys.executable, str(script), "10", *args, "--output-dir", str(killed_dir)], cwd=ROOT,
                              env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    with threads(1):  # the uninterrupted run, in this process meanwhile, through the same command line
        assert cli.main(["pretrain", *args, "--output-dir", str(straight_dir)]) == 0, capsys.readouterr()
    output = killed.communicate(timeout=180)[0]
    assert killed.returncode == -signal.SIGKILL, output  # it really died mid-run
    assert not (killed_dir / CHECKPOINT_FILE).exists()
    assert len(list(killed_dir.glob(f".{STATE_FILE}.*.tmp"))) == 1  # the write the kill cut short
    saved = torch.load(killed_dir / STATE_FILE, weights_only=True)["trainer"]  # the last completed state is intact
    assert (saved["epoch"], saved["step_in_epoch"], saved["step"]) == (1, 2, 8)  # mid-epoch 2
    assert [r["epoch"] for r in records(killed_dir)] == [0]

    with threads(1):
        assert cli.main(["pretrain", *args, "--output-dir", str(killed_dir), "--resume"]) == 0, capsys.readouterr()

    for out in (killed_dir, straight_dir):
        assert [r["step"] for r in records(out)] == [6, 12]
        assert load_checkpoint(out / CHECKPOINT_FILE)["metadata"]["pretrain"]["steps"] == 12
    assert not list(killed_dir.glob(".*.tmp"))  # the write cut short by the kill is cleaned up
    # CPU kernels are deterministic and the state holds the RNG: the weights agree exactly
    a, b = weights_of(killed_dir / CHECKPOINT_FILE), weights_of(straight_dir / CHECKPOINT_FILE)
    for key in b:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    assert records(killed_dir)[-1]["train_loss"] == pytest.approx(records(straight_dir)[-1]["train_loss"], rel=1e-6)


# -- distributed --------------------------------------------------------------------------------------


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args, nproc=2):
    """Start ``torchrun`` with ``nproc`` CPU processes; ``.communicate()`` waits for (stdout, stderr)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                             f"--master_port={free_port()}", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def rank_checks(rank: int, world: int, port: int, marker_dir: str) -> None:
    """One rank of the reduction checks, in a process joined to the others as torchrun joins them."""
    from effsk.training import distributed

    torch.set_num_threads(1)  # a forked child must not use the parent's OpenMP pool
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    env = distributed.setup("cpu")
    assert env.rank == rank and env.is_distributed
    rows = distributed.all_gather_cat(torch.full((rank + 1, 2), float(rank)))  # ranks hold 1 and 2 rows
    assert rows.tolist() == [[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]], rows
    bn = nn.BatchNorm1d(3)
    bn.running_mean.fill_(2.0 * rank)
    bn.running_var.fill_(1.0 + rank)
    distributed.average_buffers(bn)
    assert bn.running_mean.tolist() == [1.0] * 3 and bn.running_var.tolist() == [1.5] * 3
    assert bn.num_batches_tracked.item() == 0  # integer buffers are left alone
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    distributed.check_same_across_ranks(model)  # identical: passes
    with torch.no_grad():
        model.bias[0] += 1e-7 * rank
    try:
        distributed.check_same_across_ranks(model)
    except RuntimeError as exc:
        assert "differs between ranks" in str(exc), exc
    else:
        raise AssertionError("a one-ulp difference between ranks went unnoticed")
    open(os.path.join(marker_dir, f"rank{rank}.ok"), "w").close()
    distributed.teardown()


def test_rank_reductions_under_gloo(tmp_path):
    # Two processes forked from this one (torch already imported: no interpreter start-ups), joined
    # through torchrun's environment variables; torchrun itself launches the DDP run below.
    context = multiprocessing.get_context("fork")
    port = free_port()
    ranks = [context.Process(target=rank_checks, args=(rank, 2, port, str(tmp_path))) for rank in range(2)]
    for process in ranks:
        process.start()
    for process in ranks:
        process.join(timeout=120)
    for process in ranks:
        if process.is_alive():
            process.kill()
    assert [process.exitcode for process in ranks] == [0, 0]  # a failed check: the traceback is on stderr
    # one marker file per rank: each rank ran every check
    assert sorted(p.name for p in tmp_path.glob("rank*.ok")) == ["rank0.ok", "rank1.ok"]


def test_two_gloo_processes_equal_one_process_with_the_same_global_batch(data, tmp_path, capsys):
    """Under DDP each rank normalises its own half batch; with BatchNorm held in eval mode
    (freeze="bn") and no randomness (no augmentation, dropout or stochastic depth) two ranks with 4
    images each compute exactly what one process computes with 8, up to float summation order."""
    train, _ = data
    args = [str(train), *TINY, "--epochs", "2", "--batch-size", "8", "--val-fraction", "0.25", "--lr", "0.002",
            "--save-every-steps", "3", "--set", "freeze=bn", "--set", "augment=none", "--set", "drop_rate=0.0",
            "--set", "drop_path_rate=0.0", "--set", "ema_decay=0.9"]
    ddp = torchrun(["-m", "effsk", "pretrain", *args, "--output-dir", str(tmp_path / "ddp")])
    with threads(1):  # the one-process reference runs here meanwhile, through the same command line
        assert cli.main(["pretrain", *args, "--output-dir", str(tmp_path / "single")]) == 0, capsys.readouterr()
    out, err = ddp.communicate(timeout=300)
    assert ddp.returncode == 0, out + err
    assert out.count("wrote ") == 1  # rank 0 alone reports and writes

    ddp_log, single_log = records(tmp_path / "ddp"), records(tmp_path / "single")
    assert [r["step"] for r in ddp_log] == [r["step"] for r in single_log] == [4, 8]
    for a, b in zip(ddp_log, single_log):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5)
        assert (a["val_top1"], a["val_top5"], a["lr"]) == (b["val_top1"], b["val_top5"], b["lr"])
    a, b = weights_of(tmp_path / "ddp" / CHECKPOINT_FILE), weights_of(tmp_path / "single" / CHECKPOINT_FILE)
    for key in b:  # measured: largest difference ~2e-5 (weights of order 0.1-1)
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=1e-4)
    assert sorted(os.listdir(tmp_path / "ddp")) == sorted(os.listdir(tmp_path / "single"))


def test_public_pretrain_is_the_function_even_after_its_module_is_imported():
    import importlib

    import effsk

    importlib.import_module("effsk.training.pretraining")
    assert callable(effsk.pretrain) and effsk.pretrain.__module__ == "effsk.training.pretraining"
