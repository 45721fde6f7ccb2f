"""GPU benchmark suite: effsk against torchvision (and timm) in one run, each row in img/s and as a ratio.

Sections (every row runs the weights' autocast dtype, ``precision="auto"``: bf16 or fp16 on a GPU, fp32
on the CPU; the reference row of each section is torchvision's):

* ``featurize tensors``: preprocessed float32 batches already on the device -> pooled features, for
  B0@224 (batch 256), B3@300 and B7@600. torchvision and timm run under autocast with channels_last;
  effsk runs its inference copy (:func:`effsk.nn.inference.optimize_for_inference`: BatchNorm folded,
  channels_last, weights in the autocast dtype), loaded with torchvision's weights and checked against
  torchvision's features before it is timed.
* ``featurize JPEG files``: about 2,000 JPEG photo crops of several sizes written to a temporary folder,
  end to end to pooled features with B0@224: torchvision's textbook pipeline (``decode_jpeg`` and
  ``transforms.v2`` in DataLoader workers), ``EfficientNetFeaturizer.transform`` with ``decode="cpu"``
  (decoding in workers) and with its default ``decode="auto"`` (on CUDA: nvJPEG decoding and
  resize/crop/normalise on the device), and that GPU-fed pipeline without the estimator
  (:func:`effsk.data.gpu_decode.make_device_loader` + the inference copy). ``--compile`` adds the
  featurizer with ``backend="compile"`` (its compilation, in the untimed warm-up pass, is in the note).
  Workers: ``resolve_num_workers("auto")``.
* ``fine-tune``: training images/s of B0@224 from uint8 arrays, a plain torchvision AMP loop against
  ``EfficientNetClassifier.fit`` (same data, transform, optimiser, batch, workers); the second epoch
  is timed (the first pays for warm-up), training steps only.

Each row is wrapped: a failing row is reported in the table's status column and the others still run;
the exit code is 1 if any row failed. Rows not started within ``--budget-s`` are reported as skipped.
Writes ``gpu_suite.csv`` and ``gpu_suite.md`` to ``--out`` and prints the table.

    python benchmarks/gpu_suite.py --out gpu-out                  # a GPU machine, under 5 minutes
    python benchmarks/gpu_suite.py --device cpu --smoke --out tmp  # every row in seconds (CI)
"""

from __future__ import annotations

import argparse
import csv
import functools
import gc
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))  # featurize.py's helpers, however this file is loaded

from effsk.data.gpu_decode import make_device_loader, resolve_decode, resolve_num_workers  # noqa: E402
from effsk.data.preprocessing import default_preprocessing  # noqa: E402
from effsk.nn import efficientnet  # noqa: E402
from effsk.nn.inference import optimize_for_inference  # noqa: E402
from effsk.scaling import resolve  # noqa: E402
from effsk.utils.runtime import autocast, resolve_device, resolve_precision  # noqa: E402
from featurize import _pooled, _randomise_bn, _torchvision_transform  # noqa: E402

warnings.filterwarnings("ignore", "The image decoding and encoding capabilities")  # torchvision 0.29's notice

TENSORS, JPEG, FINETUNE = "featurize tensors", "featurize JPEG files", "fine-tune"
TORCHVISION = "torchvision AMP + channels_last"
COLUMNS = ["section", "model", "row", "precision", "batch", "images", "img_per_s", "vs_torchvision", "status", "note"]


@dataclass(frozen=True)
class Spec:
    phi: str
    resolution: int
    batch: int
    images: int

    @property
    def label(self) -> str:
        return f"{self.phi.upper()}@{self.resolution}"


@dataclass(frozen=True)
class Sizes:
    tensors: tuple[Spec, ...]
    jpeg: Spec
    jpeg_side: tuple[int, int]  # shorter side range of the written photos
    finetune: Spec
    finetune_side: int
    repeats: int


FULL = Sizes(
    tensors=(Spec("b0", 224, 256, 2048), Spec("b3", 300, 128, 512), Spec("b7", 600, 32, 128)),
    jpeg=Spec("b0", 224, 256, 2048), jpeg_side=(300, 427),
    finetune=Spec("b0", 224, 256, 2048), finetune_side=256,
    repeats=3,
)
SMOKE = Sizes(
    tensors=(Spec("b0", 32, 4, 8), Spec("b3", 40, 2, 4), Spec("b7", 32, 2, 2)),
    jpeg=Spec("b0", 32, 4, 8), jpeg_side=(36, 48),
    finetune=Spec("b0", 32, 4, 8), finetune_side=36,
    repeats=1,
)


@dataclass
class Row:
    section: str
    model: str
    row: str
    precision: str
    batch: int
    images: int
    img_per_s: float | None = None
    vs_torchvision: float | None = None
    status: str = "ok"
    note: str = ""


class SkipRow(Exception):
    """The row cannot run here (a missing optional package); reported, not a failure."""


@dataclass
class Suite:
    device: torch.device
    dtype: torch.dtype | None
    sizes: Sizes
    workers: int
    deadline: float
    out: Path
    header: str = ""
    rows: list = field(default_factory=list)
    compile: bool = False  # add the featurizer's backend="compile" row

    @property
    def precision(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]

    def run(self, section: str, spec: Spec, name: str, measure) -> None:
        """``measure()`` -> ``(img/s, note)``; any exception becomes the row's status."""
        row = Row(section, spec.label, name, self.precision, spec.batch, spec.images)
        if time.monotonic() > self.deadline:
            row.status = "skipped: time budget spent"
        else:
            try:
                row.img_per_s, row.note = measure()
            except SkipRow as exc:
                row.status = f"skipped: {exc}"
            except Exception as exc:  # noqa: BLE001 - one broken row must not end the suite
                traceback.print_exc()
                first_line = (str(exc).strip().splitlines() or [""])[0][:160]
                row.status = f"FAILED: {type(exc).__name__}: {first_line}"
            finally:
                if self.device.type == "cuda":  # give the row's memory back (gc.collect costs ~1 s on a CPU box)
                    gc.collect()
                    torch.cuda.empty_cache()
        self.rows.append(row)
        self.save()  # after every row: a run cut short by a timeout still leaves its table
        rate = "-" if row.img_per_s is None else f"{row.img_per_s:.1f} img/s"
        print(f"[{time.strftime('%H:%M:%S')}] {section} | {spec.label} | {name}: {rate} {row.status}", flush=True)

    def save(self) -> str:
        """Write ``gpu_suite.csv`` and ``gpu_suite.md`` (ratios included) to ``out``; return the markdown."""
        add_ratios(self.rows)
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / "gpu_suite.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=COLUMNS)
            writer.writeheader()
            for r in self.rows:
                writer.writerow({c: getattr(r, c) for c in COLUMNS})
        table = f"{self.header}\n\n{markdown_table(self.rows)}\n"
        (self.out / "gpu_suite.md").write_text(table)
        return table

    def images_per_second(self, one_pass, images: int) -> float:
        """Median over ``repeats`` timed passes after one warm-up pass (cuDNN plans, allocator, workers)."""
        one_pass()
        times = []
        for _ in range(self.sizes.repeats):
            self.sync()
            start = time.perf_counter()
            one_pass()
            self.sync()
            times.append(time.perf_counter() - start)
        return images / statistics.median(times)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


# ------------------------------------------------------------------------------------------------ models
@functools.cache
def _torchvision_and_effsk(phi: str):
    """torchvision's model (random weights, BatchNorm randomised) and effsk's with the same state_dict."""
    tv = getattr(torchvision.models, f"efficientnet_{phi}")().eval()
    _randomise_bn(tv)  # non-trivial statistics, so that a folding or layout bug shows in the parity check
    ours = efficientnet(phi).eval()
    ours.load_state_dict(tv.state_dict())
    return tv, ours


def _autocast_channels_last(suite: Suite, model: nn.Module):
    """torchvision's or timm's model as their docs run it fast: channels_last weights and inputs, autocast.
    Moves ``model`` itself to the device (``nn.Module.to`` works in place)."""
    model = model.to(suite.device, memory_format=torch.channels_last).eval()
    pooled = _pooled(model)

    def features(x):
        with autocast(suite.device, suite.dtype):
            return pooled(x.contiguous(memory_format=torch.channels_last))

    return features


def _forward_all(features, batches) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([features(x).float() for x in batches])


def _fp32_parity(suite: Suite, tv: nn.Module, ours: nn.Module, probe: torch.Tensor, limit: float = 1e-3) -> float:
    """Max relative difference of effsk's inference copy and torchvision's pooled features, both in true fp32
    (TF32 off): the same weights must give the same features before any speed is worth reporting."""
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        fast = optimize_for_inference(ours, device=suite.device)
        with torch.inference_mode():
            got = _pooled(fast)(probe).float()
            expected = _pooled(tv.to(suite.device).eval())(probe).float()
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    rel = ((got - expected).abs().max() / expected.abs().max().clamp_min(1e-12)).item()
    if not rel <= limit:
        raise AssertionError(f"effsk's fp32 features differ from torchvision's by {rel:.1e} (limit {limit:.0e})")
    return rel


# ------------------------------------------------------------------------------------------------ sections
def featurize_tensors(suite: Suite, spec: Spec) -> None:
    g = torch.Generator(device=suite.device).manual_seed(0)
    batches = torch.randn(spec.images, 3, spec.resolution, spec.resolution, device=suite.device, generator=g)
    batches = batches.split(spec.batch)

    def torchvision_row():
        features = _autocast_channels_last(suite, _torchvision_and_effsk(spec.phi)[0])
        return suite.images_per_second(lambda: _forward_all(features, batches), spec.images), ""

    def effsk_row():
        rel = _fp32_parity(suite, *_torchvision_and_effsk(spec.phi), batches[0][:8])
        fast = optimize_for_inference(_torchvision_and_effsk(spec.phi)[1], device=suite.device, dtype=suite.dtype)
        note = f"fp32 features vs torchvision: max rel diff {rel:.1e}"
        return suite.images_per_second(lambda: _forward_all(_pooled(fast), batches), spec.images), note

    def timm_row():
        try:
            import timm
        except ImportError:
            raise SkipRow("timm is not installed") from None
        features = _autocast_channels_last(suite, timm.create_model(f"efficientnet_{spec.phi}", pretrained=False))
        return suite.images_per_second(lambda: _forward_all(features, batches), spec.images), f"timm {timm.__version__}"

    suite.run(TENSORS, spec, TORCHVISION, torchvision_row)
    suite.run(TENSORS, spec, "effsk optimize_for_inference", effsk_row)
    suite.run(TENSORS, spec, "timm AMP + channels_last", timm_row)


def write_photo_jpegs(folder: str, n: int, side: tuple[int, int], seed: int = 0) -> list[str]:
    """``n`` JPEGs (quality 90) of random crops of scikit-learn's two sample photos, shorter sides in ``side``."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.default_rng(seed)
    paths = []
    for k in range(n):
        photo = photos[k % len(photos)]
        short = int(rng.integers(side[0], side[1] + 1))
        h, w = short, min(photo.shape[1], int(short * rng.uniform(1.0, 1.5)))
        h = min(h, photo.shape[0])
        y, x = rng.integers(0, photo.shape[0] - h + 1), rng.integers(0, photo.shape[1] - w + 1)
        crop = photo[y:y + h, x:x + w]
        paths.append(os.path.join(folder, f"photo_{k:05d}.jpg"))
        Image.fromarray(np.ascontiguousarray(crop)).save(paths[-1], quality=90)
    return paths


class _TorchvisionFiles(Dataset):
    """The textbook torchvision pipeline: read, decode_jpeg, transforms.v2, per image in a worker."""

    def __init__(self, paths, transform):
        self.paths, self.transform = paths, transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        from torchvision.io import decode_jpeg, read_file

        return self.transform(decode_jpeg(read_file(self.paths[i])))


def featurize_jpeg_files(suite: Suite, spec: Spec, paths: list[str]) -> None:
    from effsk import EfficientNetFeaturizer

    prep = default_preprocessing(resolve(spec.phi)).with_resolution(spec.resolution)
    on_gpu = suite.device.type == "cuda"

    def torchvision_row():
        features = _autocast_channels_last(suite, _torchvision_and_effsk(spec.phi)[0])
        loader = DataLoader(_TorchvisionFiles(paths, _torchvision_transform(prep)), batch_size=spec.batch,
                            num_workers=suite.workers, pin_memory=on_gpu)
        one_pass = lambda: _forward_all(features, (x.to(suite.device, non_blocking=True) for x in loader))  # noqa: E731
        return suite.images_per_second(one_pass, len(paths)), f"{suite.workers} workers"

    def featurizer_row(decode, backend="eager"):
        featurizer = EfficientNetFeaturizer(spec.phi, weights=None, resolution=spec.resolution, batch_size=spec.batch,
                                            device=str(suite.device), precision="auto", num_workers=suite.workers,
                                            decode=decode, backend=backend)
        featurizer.fit()
        started = time.perf_counter()
        featurizer.transform(paths[: spec.batch])  # compiles for backend="compile"
        first_s = time.perf_counter() - started
        rate = suite.images_per_second(lambda: featurizer.transform(paths), len(paths))
        note = f"decode={decode!r} -> {resolve_decode(decode, suite.device)}, {suite.workers} workers"
        return rate, note + (f", first batch (compiling) {first_s:.0f} s" if backend == "compile" else "")

    def gpu_decode_row():
        fast = optimize_for_inference(_torchvision_and_effsk(spec.phi)[1], device=suite.device, dtype=suite.dtype)
        loader = make_device_loader(paths, prep, device=suite.device, batch_size=spec.batch, num_workers=suite.workers)
        one_pass = lambda: _forward_all(_pooled(fast), (images for images, _ in loader))  # noqa: E731
        decoder = "nvJPEG" if on_gpu else "libjpeg (no CUDA)"
        return suite.images_per_second(one_pass, len(paths)), f"{decoder}, {suite.workers} workers"

    suite.run(JPEG, spec, "torchvision decode + v2 in workers, " + TORCHVISION, torchvision_row)
    suite.run(JPEG, spec, "effsk EfficientNetFeaturizer.transform, decode='cpu'", lambda: featurizer_row("cpu"))
    suite.run(JPEG, spec, "effsk EfficientNetFeaturizer.transform, decode='auto'", lambda: featurizer_row("auto"))
    suite.run(JPEG, spec, "effsk make_device_loader + optimize_for_inference", gpu_decode_row)
    if suite.compile:
        suite.run(JPEG, spec, "effsk EfficientNetFeaturizer.transform, decode='auto', backend='compile'",
                  lambda: featurizer_row("auto", "compile"))


class _Arrays(Dataset):
    def __init__(self, images, labels, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.transform(torch.from_numpy(self.images[i]).permute(2, 0, 1)), int(self.labels[i])


def _plain_torchvision_epoch_rates(suite: Suite, spec: Spec, X, y, epochs: int) -> list[float]:
    """A textbook torchvision AMP training loop (AdamW, label smoothing, channels_last); img/s per epoch."""
    prep = default_preprocessing(resolve(spec.phi)).with_resolution(spec.resolution)
    torch.manual_seed(0)
    model = getattr(torchvision.models, f"efficientnet_{spec.phi}")(num_classes=int(y.max()) + 1)
    model = model.to(suite.device, memory_format=torch.channels_last).train()
    loader = DataLoader(_Arrays(X, y, _torchvision_transform(prep)), batch_size=spec.batch, shuffle=True,
                        num_workers=suite.workers, pin_memory=suite.device.type == "cuda", drop_last=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    scaler = torch.amp.GradScaler(suite.device.type, enabled=suite.dtype == torch.float16)
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    rates = []
    for _ in range(epochs):
        start, seen, running = time.perf_counter(), 0, torch.zeros((), device=suite.device)
        for inputs, targets in loader:
            inputs = inputs.to(suite.device, non_blocking=True, memory_format=torch.channels_last)
            targets = targets.to(suite.device, non_blocking=True)
            with autocast(suite.device, suite.dtype):
                loss = criterion(model(inputs), targets)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            running += loss.detach() * inputs.shape[0]
            seen += inputs.shape[0]
        running.item()  # wait for the device, as effsk's epoch end does
        rates.append(seen / (time.perf_counter() - start))
    return rates


def fine_tune(suite: Suite, spec: Spec) -> None:
    from effsk import EfficientNetClassifier

    rng = np.random.default_rng(0)
    side = suite.sizes.finetune_side
    X = rng.integers(0, 256, (spec.images, side, side, 3), dtype=np.uint8)
    y = np.arange(spec.images) % 10
    epochs = 2

    def torchvision_row():
        rates = _plain_torchvision_epoch_rates(suite, spec, X, y, epochs)
        return rates[-1], f"epoch {epochs} of {epochs}, {suite.workers} workers"

    def effsk_row():
        clf = EfficientNetClassifier(spec.phi, weights=None, resolution=spec.resolution, max_epochs=epochs,
                                     batch_size=spec.batch, augment="none", early_stopping=False,
                                     device=str(suite.device), precision="auto", num_workers=suite.workers,
                                     random_state=0)
        clf.fit(X, y)
        return clf.history_[-1]["images_per_second"], f"epoch {epochs} of {epochs}, {suite.workers} workers"

    suite.run(FINETUNE, spec, "plain torchvision AMP loop, channels_last", torchvision_row)
    suite.run(FINETUNE, spec, "effsk EfficientNetClassifier.fit", effsk_row)


# ------------------------------------------------------------------------------------------------ report
def add_ratios(rows: list[Row]) -> None:
    """Each row's img/s over the torchvision row of its section and model."""
    reference = {(r.section, r.model): r.img_per_s for r in rows if r.row.startswith(("torchvision", "plain torchvision"))}
    for r in rows:
        ref = reference.get((r.section, r.model))
        if r.img_per_s is not None and ref:
            r.vs_torchvision = r.img_per_s / ref


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}" if value < 100 else f"{value:.0f}"
    return str(value).replace("|", "/")


def markdown_table(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(getattr(r, c)) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def machine_line(suite: Suite) -> str:
    gpu = torch.cuda.get_device_name(suite.device) if suite.device.type == "cuda" else platform.processor() or "cpu"
    try:
        import timm

        timm_version = timm.__version__
    except ImportError:
        timm_version = "not installed"
    return (f"device {suite.device} ({gpu}), precision {suite.precision}, torch {torch.__version__}, torchvision "
            f"{torchvision.__version__}, timm {timm_version}, {os.cpu_count()} CPUs, {suite.workers} DataLoader workers, "
            f"cudnn.benchmark {torch.backends.cudnn.benchmark}")




def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for gpu_suite.csv and gpu_suite.md")
    parser.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cuda, cpu")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: every row in seconds (CI keeps the script alive)")
    parser.add_argument("--budget-s", type=float, default=200.0,
                        help="start no row after this many seconds (gpu-check stops the script at 300 s)")
    parser.add_argument("--workers", default="auto", help="DataLoader workers for the file and fine-tune rows")
    parser.add_argument("--compile", action="store_true",
                        help="add the featurizer with backend='compile' to the JPEG rows (a minute of compiling)")
    args = parser.parse_args(argv)
    started = time.monotonic()
    device = resolve_device(args.device)
    sizes = SMOKE if args.smoke else FULL
    workers = resolve_num_workers(args.workers if args.workers == "auto" else int(args.workers), device)
    suite = Suite(device, resolve_precision("auto", device), sizes, workers, started + args.budget_s, Path(args.out),
                  compile=args.compile)
    suite.header = f"effsk GPU suite ({'smoke' if args.smoke else 'full'}): {machine_line(suite)}"
    print(suite.header, flush=True)
    for spec in sizes.tensors:
        featurize_tensors(suite, spec)
    with tempfile.TemporaryDirectory(prefix="effsk-gpu-suite-") as folder:
        try:
            paths = write_photo_jpegs(folder, sizes.jpeg.images, sizes.jpeg_side)
        except Exception:  # noqa: BLE001 - the JPEG rows report it
            traceback.print_exc()
            paths = []
        featurize_jpeg_files(suite, sizes.jpeg, paths)
    fine_tune(suite, sizes.finetune)
    print()
    print(suite.save())
    failed = [r for r in suite.rows if r.status.startswith("FAILED")]
    print(f"{len(suite.rows)} rows, {len(failed)} failed, {time.monotonic() - started:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
