"""Featurization throughput: effsk against torchvision (and timm when installed), in one run.

Three input sources, each timed for every row over the same images:

* ``tensors``: model level. Preprocessed float32 NCHW tensors (already resized, cropped, normalised)
  go through each model's forward to pooled features. This isolates the inference path.
* ``arrays``: end to end from decoded uint8 images ``(N, H, W, 3)`` (H x W = 1.25 x the crop, so
  every pipeline resizes and crops).
* ``jpeg``: end to end from JPEG files written to a temporary directory.

End-to-end effsk rows go through the public ``EfficientNetFeaturizer(...).fit(X).transform(X)``; when
that class is not importable, a clearly labelled row runs ``optimize_for_inference`` behind
torchvision's preprocessing instead. torchvision's baseline pipeline is what a torchvision user writes:
``transforms.v2`` (batched for arrays, per image after ``decode_jpeg`` for files), then the model.

Before timing, effsk's model is loaded with torchvision's state_dict (BatchNorm statistics randomised so
a mismatch shows) and their pooled features are compared. timm's model has other parameter names; its
rows are a speed reference only.

Run ``python benchmarks/featurize.py --help``; README.md in this folder holds measured tables.
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from effsk.nn import efficientnet  # noqa: E402
from effsk.nn.inference import optimize_for_inference  # noqa: E402
from effsk.utils.runtime import resolve_device  # noqa: E402
from effsk.scaling import resolve  # noqa: E402
from effsk.weights import variant_preprocessing  # noqa: E402

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Row:
    source: str
    name: str
    precision: str
    run: Callable[[], object]  # one full pass over the N images
    setup_s: float = 0.0
    times: list = field(default_factory=list)
    peak_mib: float | None = None
    extra_mib: float | None = None  # peak minus RSS at the row's start: what the pass itself needed
    note: str = ""


# ---------------------------------------------------------------------------------------------- memory
def _reset_peak_rss() -> bool:
    """Linux lets a process reset its RSS high-water mark (VmHWM); elsewhere only the lifetime peak exists."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mib() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    scale = 1 if platform.system() == "Darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def _rss_mib() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


# ---------------------------------------------------------------------------------------------- inputs
def _synthetic_images(n: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """Smooth random colour fields plus mild noise: JPEG sizes and decode times like photos, not noise."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 6, 8, generator=g)
    smooth = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False)
    noisy = smooth + 0.03 * torch.randn(n, 3, height, width, generator=g)
    return (noisy.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def _write_jpegs(images: np.ndarray, folder: str) -> list[str]:
    from PIL import Image

    paths = []
    for i, image in enumerate(images):
        path = os.path.join(folder, f"img_{i:06d}.jpg")
        Image.fromarray(image).save(path, quality=90)
        paths.append(path)
    return paths


def _torchvision_transform(pre):
    from torchvision.transforms import InterpolationMode, v2

    return v2.Compose(
        [
            v2.Resize(pre.resize_size, interpolation=InterpolationMode(pre.interpolation), antialias=True),
            v2.CenterCrop(pre.crop_size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(pre.mean, pre.std),
        ]
    )


# ---------------------------------------------------------------------------------------------- models
def _randomise_bn(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)


def _pooled(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """Pooled features (what the featurizer returns) for torchvision-, timm- and effsk-shaped models."""
    if hasattr(model, "forward_head"):  # effsk and timm
        return lambda x: model.forward_head(model.forward_features(x), pre_logits=True)
    return lambda x: torch.flatten(model.avgpool(model.features(x)), 1)


LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


def _forward_batches(fn, batches, device, dtype, layout, to_device=False):
    """Forward each batch under autocast ``dtype`` (None: none); ``layout`` None passes inputs as they come
    (effsk converts on entry), else they are made NCHW- or channels_last-contiguous first."""
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else _null()
    outs = []
    with torch.inference_mode(), autocast:
        for x in batches:
            if to_device:
                x = x.to(device, non_blocking=True)
            if layout is not None:
                x = x.contiguous(memory_format=LAYOUTS[layout])
            outs.append(fn(x).float())
    return outs


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


# ---------------------------------------------------------------------------------------------- rows
def _build_rows(args, device, scaling, pre, data, notes):
    k = scaling.name[1:] if scaling.name and scaling.name.startswith("b") else None
    import torchvision.models as tvm

    tv = getattr(tvm, f"efficientnet_b{k}")().eval() if k is not None else None
    if tv is None:
        notes.append(f"phi={args.phi!r} is not a published b0..b7: torchvision and timm rows are skipped")
    ours = efficientnet(args.phi).eval()
    if tv is not None:
        _randomise_bn(tv)
        ours.load_state_dict(tv.state_dict())
    timm_model = None
    try:
        import timm

        if k is not None:
            timm_model = timm.create_model(f"efficientnet_b{k}", pretrained=False).eval()
    except ImportError:
        notes.append("timm is not installed: its rows are skipped (pip install timm)")

    featurizer_cls = None
    try:
        from effsk import EfficientNetFeaturizer as featurizer_cls  # noqa: N813
    except (ImportError, AttributeError) as exc:
        notes.append(f"effsk.EfficientNetFeaturizer is unavailable ({exc}); end-to-end effsk rows use "
                     "optimize_for_inference behind torchvision's preprocessing and are marked [model+tv-pre]")

    tensors = data["tensors"]
    batches = list(torch.split(tensors, args.batch_size))
    on_gpu = device.type == "cuda"
    if on_gpu:
        batches = [b.to(device) for b in batches]
    transform = _torchvision_transform(pre)
    rows: list[Row] = []

    def timed_setup(fn):
        t0 = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - t0

    # ---- verification: effsk (optimised) against torchvision on the same weights and tensors
    if tv is not None:
        probe = batches[0][: min(8, len(batches[0]))]
        with torch.inference_mode():
            ref = _pooled(tv.to(device))(probe).float()
            for precision in args.precision:
                fast = optimize_for_inference(ours, device=device, dtype=DTYPES[precision])
                got = _pooled(fast)(probe).float()
                rel = _max_rel_diff(got, ref)
                limit = 1e-4 if precision == "fp32" else 3e-2
                status = "ok" if rel <= limit else "MISMATCH"
                notes.append(f"check effsk {precision} vs torchvision fp32 pooled features: max rel diff {rel:.1e} "
                             f"(limit {limit:.0e}) {status}")
                if status != "ok":
                    raise SystemExit("effsk and torchvision disagree; not timing")

    for precision in args.precision:
        dtype = DTYPES[precision]
        # ---- model level: preprocessed tensors
        if tv is not None:
            tv_nchw = copy.deepcopy(tv).to(device)
            if precision == "fp32":
                rows.append(Row("tensors", "torchvision eager NCHW", precision,
                                lambda m=tv_nchw: _forward_batches(_pooled(m), batches, device, None, "nchw")))
            tv_cl = copy.deepcopy(tv).to(device, memory_format=torch.channels_last)
            rows.append(Row("tensors", "torchvision channels_last" + (" autocast" if dtype else ""), precision,
                            lambda m=tv_cl, d=dtype: _forward_batches(_pooled(m), batches, device, d, "channels_last")))
        if timm_model is not None:
            tm = copy.deepcopy(timm_model).to(device, memory_format=torch.channels_last)
            rows.append(Row("tensors", "timm channels_last" + (" autocast" if dtype else ""), precision,
                            lambda m=tm, d=dtype: _forward_batches(_pooled(m), batches, device, d, "channels_last")))
        fast, setup = timed_setup(lambda d=dtype: optimize_for_inference(ours, device=device, dtype=d))
        rows.append(Row("tensors", "effsk optimize_for_inference", precision,
                        lambda m=fast: _forward_batches(_pooled(m), batches, device, None, None), setup))
        if args.compile:
            compiled = optimize_for_inference(ours, device=device, dtype=dtype, backend="compile")
            t0 = time.perf_counter()
            first = _forward_batches(_pooled(compiled), batches[:1], device, None, None)[0]  # compiles
            _sync(device)
            if tv is not None:
                eager = _forward_batches(_pooled(fast), batches[:1], device, None, None)[0]
                rel, limit = _max_rel_diff(first, eager), (1e-4 if dtype is None else 3e-2)
                notes.append(f"check effsk {precision} backend=compile vs eager: max rel diff {rel:.1e} "
                             f"(limit {limit:.0e}) {'ok' if rel <= limit else 'MISMATCH'}")
            rows.append(Row("tensors", "effsk optimize_for_inference backend=compile", precision,
                            lambda m=compiled: _forward_batches(_pooled(m), batches, device, None, None),
                            time.perf_counter() - t0, note="setup = compile + first batch"))
        if args.ablation:
            _add_ablation_rows(rows, ours, batches, device, dtype, precision)

        # ---- end to end: uint8 arrays and JPEG files
        for source in ("arrays", "jpeg"):
            if source not in args.sources:
                continue
            X = data[source]
            if tv is not None and precision == "fp32":
                tv_e2e = copy.deepcopy(tv).to(device)
                rows.append(Row(source, "torchvision eager NCHW", precision,
                                lambda m=tv_e2e, s=source: _torchvision_pipeline(m, s, data, transform, args, device,
                                                                                 None, "nchw")))
            if tv is not None:
                tv_e2e_cl = copy.deepcopy(tv).to(device, memory_format=torch.channels_last)
                rows.append(Row(source, "torchvision channels_last" + (" autocast" if dtype else ""), precision,
                                lambda m=tv_e2e_cl, s=source, d=dtype: _torchvision_pipeline(
                                    m, s, data, transform, args, device, d, "channels_last")))
            if featurizer_cls is not None:
                feat, setup = timed_setup(lambda d=precision, X=X: featurizer_cls(
                    args.phi, weights=None, batch_size=args.batch_size, precision=d, device=str(device)).fit(X))
                rows.append(Row(source, "effsk EfficientNetFeaturizer.transform", precision,
                                lambda f=feat, X=X: f.transform(X), setup, note="setup = fit"))
                if source == "arrays" and tv is not None:
                    notes.append(_check_featurizer(feat, tv, X, transform, precision, device))
            else:
                fast_e2e = optimize_for_inference(ours, device=device, dtype=dtype)
                rows.append(Row(source, "effsk optimize_for_inference [model+tv-pre]", precision,
                                lambda m=fast_e2e, s=source: _torchvision_pipeline(m, s, data, transform, args, device,
                                                                                   None, None)))
    return rows


def _add_ablation_rows(rows, ours, batches, device, dtype, precision):
    """One option off at a time, plus the alternatives measured and not chosen (autocast, jit)."""
    variants = {"effsk no BN folding": dict(fold_bn=False), "effsk NCHW (no channels_last)": dict(channels_last=False)}
    for name, kwargs in variants.items():
        m = optimize_for_inference(ours, device=device, dtype=dtype, **kwargs)
        rows.append(Row("tensors", name, precision,
                        lambda m=m: _forward_batches(_pooled(m), batches, device, None, None)))
    if dtype is not None:
        fp32 = optimize_for_inference(ours, device=device)
        rows.append(Row("tensors", "effsk fp32 weights + autocast", precision,
                        lambda m=fp32, d=dtype: _forward_batches(_pooled(m), batches, device, d, None)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated; measured for the record
        fast = optimize_for_inference(ours, device=device, dtype=dtype)
        example = batches[0][:2].to(dtype or torch.float32).contiguous(memory_format=torch.channels_last)
        t0 = time.perf_counter()
        with torch.inference_mode():
            traced = torch.jit.freeze(torch.jit.trace(nn.Sequential(fast.features, fast.avgpool, nn.Flatten(1)).eval(),
                                                      example))
            traced(example)
        setup = time.perf_counter() - t0
    rows.append(Row("tensors", "effsk + torch.jit.trace/freeze", precision,
                    lambda m=traced, d=dtype: _forward_batches(m, [b.to(d or torch.float32) for b in batches],
                                                               device, None, "channels_last"), setup))


def _torchvision_pipeline(model, source, data, transform, args, device, dtype, layout):
    """What a torchvision user writes: decode, transforms.v2, stack, forward, pool."""
    from torchvision.io import decode_jpeg, read_file

    n, bs = len(data["arrays"]), args.batch_size
    fn = _pooled(model)
    outs = []
    for start in range(0, n, bs):
        if source == "arrays":
            chunk = torch.from_numpy(data["arrays"][start:start + bs]).permute(0, 3, 1, 2)
            x = transform(chunk)
        else:
            x = torch.stack([transform(decode_jpeg(read_file(p))) for p in data["jpeg"][start:start + bs]])
        outs.extend(_forward_batches(fn, [x], device, dtype, layout, to_device=device.type != "cpu"))
    return outs


def _check_featurizer(feat, tv, X, transform, precision, device):
    model = getattr(feat, "model_", None)
    if not isinstance(model, nn.Module):
        return "check featurizer vs torchvision: skipped (no model_ attribute to copy weights from)"
    reference = copy.deepcopy(tv).to(device)
    try:
        reference.load_state_dict(model.state_dict())
    except RuntimeError as exc:
        return f"check featurizer vs torchvision: skipped (state_dict does not load: {str(exc)[:80]})"
    n = min(8, len(X))
    got = torch.as_tensor(np.asarray(feat.transform(X[:n])))
    with torch.inference_mode():
        x = transform(torch.from_numpy(X[:n]).permute(0, 3, 1, 2)).to(device)
        ref = _pooled(reference)(x).float().cpu()
    rel = _max_rel_diff(got, ref)
    limit = 1e-3 if precision == "fp32" else 5e-2  # resize kernels may differ slightly between pipelines
    return (f"check featurizer {precision} vs torchvision pipeline on arrays: max rel diff {rel:.1e} "
            f"(limit {limit:.0e}) {'ok' if rel <= limit else 'MISMATCH'}")


# ---------------------------------------------------------------------------------------------- timing
def _time_rows(rows, args, device):
    for row in rows:  # warm-up: allocator, oneDNN primitive caches, lazy compilation
        row.run()
        _sync(device)
    for row in rows:  # peak memory, one pass each
        gc.collect()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            row.run()
            _sync(device)
            row.peak_mib = torch.cuda.max_memory_allocated() / 2**20
        elif _reset_peak_rss():
            start = _rss_mib()
            row.run()
            row.peak_mib = _peak_rss_mib()
            row.extra_mib = row.peak_mib - start
    for _ in range(args.repeats):  # interleaved so that load drift hits every row alike
        for row in rows:
            _sync(device)
            t0 = time.perf_counter()
            row.run()
            _sync(device)
            row.times.append(time.perf_counter() - t0)


def _print_table(rows, args, device, notes):
    n = args.n
    baseline = {}
    for row in rows:
        if row.name == "torchvision eager NCHW" and row.precision == "fp32":
            baseline[row.source] = n / statistics.median(row.times)
    mem_label = "peak GPU MiB" if device.type == "cuda" else "peak RSS MiB (+ over start)"
    header = f"| source | row | precision | img/s | x tv eager | best img/s | {mem_label} | setup s |"
    print(header)
    print("|---|---|---|---:|---:|---:|---:|---:|")
    order = {s: i for i, s in enumerate(("tensors", "arrays", "jpeg"))}
    for row in sorted(rows, key=lambda r: order[r.source]):  # stable: keeps precision order within a source
        ips = n / statistics.median(row.times)
        ratio = f"{ips / baseline[row.source]:.2f}" if row.source in baseline else "-"
        mem = "-" if row.peak_mib is None else f"{row.peak_mib:.0f}"
        if row.extra_mib is not None:
            mem += f" (+{row.extra_mib:.0f})"
        setup = f"{row.setup_s:.1f}" if row.setup_s else "-"
        best = n / min(row.times)
        print(f"| {row.source} | {row.name} | {row.precision} | {ips:.1f} | {ratio} | {best:.1f} | {mem} | {setup} |")
    for row in rows:
        if row.note:
            notes.append(f"{row.source} / {row.name} / {row.precision}: {row.note}")
    print()
    for note in notes:
        print(f"- {note}")


def _ratios(rows, n):
    """The issue's goals: effsk vs torchvision eager fp32, timm channels_last fp32, timm bf16 channels_last."""
    ips = {(r.source, r.name, r.precision): n / statistics.median(r.times) for r in rows}
    lines = []
    ours = {p: ips.get(("tensors", "effsk optimize_for_inference", p)) for p in ("fp32", "bf16")}
    refs = {
        "torchvision eager NCHW fp32": ips.get(("tensors", "torchvision eager NCHW", "fp32")),
        "timm channels_last fp32": ips.get(("tensors", "timm channels_last", "fp32")),
        "timm channels_last autocast bf16": ips.get(("tensors", "timm channels_last autocast", "bf16")),
    }
    pairs = [("fp32", "torchvision eager NCHW fp32", 2.0), ("fp32", "timm channels_last fp32", 1.1),
             ("bf16", "timm channels_last autocast bf16", 1.3)]
    for precision, ref, goal in pairs:
        if ours[precision] and refs[ref]:
            r = ours[precision] / refs[ref]
            lines.append(f"effsk {precision} / {ref}: {r:.2f}x (goal >= {goal}x) {'met' if r >= goal else 'NOT met'}")
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--phi", default="b0", help="variant: b0..b7 or a number (baselines need b0..b7)")
    p.add_argument("--n", type=int, default=256, help="images per pass")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--precision", nargs="+", choices=list(DTYPES), default=None,
                   help="default: fp32 bf16 (bf16 autocast for torchvision/timm, bf16 weights for effsk)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, auto")
    p.add_argument("--repeats", type=int, default=5, help="timed passes per row; the median is reported")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--resolution", type=int, default=None, help="crop size (default: the variant's)")
    p.add_argument("--sources", nargs="+", choices=["tensors", "arrays", "jpeg"], default=["tensors", "arrays", "jpeg"])
    p.add_argument("--compile", action="store_true", help="add backend='compile' rows (slow first call)")
    p.add_argument("--ablation", action="store_true", help="add effsk rows with one option off, autocast and jit")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    args.precision = args.precision or ["fp32", "bf16"]
    scaling = resolve(args.phi)
    pre = variant_preprocessing(scaling)  # the variant's own weights' recipe (b1..b7: torchvision's)
    if args.resolution:
        pre = pre.with_resolution(args.resolution)

    notes = []
    h, w = round(pre.resize_size * 1.0), round(pre.resize_size * 1.25)
    arrays = _synthetic_images(args.n, h, w)
    transform = _torchvision_transform(pre)
    # .contiguous(): HWC arrays permuted to NCHW keep channels_last strides, which would hand the
    # "NCHW" baseline a channels_last input.
    tensors = transform(torch.from_numpy(arrays).permute(0, 3, 1, 2)).contiguous()
    with tempfile.TemporaryDirectory(prefix="effsk-bench-") as folder:
        data = {"arrays": arrays, "tensors": tensors, "jpeg": _write_jpegs(arrays, folder) if "jpeg" in args.sources else []}
        rows = _build_rows(args, device, scaling, pre, data, notes)
        rows = [r for r in rows if r.source in args.sources]
        base_rss = _rss_mib()
        _time_rows(rows, args, device)

        cpu = platform.processor() or platform.machine()
        print(f"effsk featurize benchmark: phi={args.phi} resolution={pre.crop_size} n={args.n} "
              f"batch={args.batch_size} device={device} threads={torch.get_num_threads()} repeats={args.repeats} "
              f"torch={torch.__version__} cpu={cpu}")
        print(f"inputs: tensors = preprocessed float32 NCHW {tuple(tensors.shape[1:])}; arrays = uint8 "
              f"(N, {h}, {w}, 3); jpeg = files of those arrays (quality 90). RSS before timing: {base_rss:.0f} MiB; "
              "img/s is the median over repeats, best the fastest repeat; peak RSS is the process's high-water mark "
              "during that row's pass (all models stay loaded), + what the pass added to the RSS at its start.")
        print()
        notes = _ratios(rows, args.n) + notes
        _print_table(rows, args, device, notes)


if __name__ == "__main__":
    main()
