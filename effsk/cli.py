"""Command-line interface: ``effsk info | featurize | pretrain | demo``.

Each subcommand lives in its own function; heavy imports happen inside them so that
``effsk --help`` stays instant.
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["main", "build_parser"]


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="print the EfficientNet family: width, depth, resolution, params, GFLOPs, weights")
    p.add_argument("--phi", nargs="+", help="phi values or names (default: b0..b7 and lite0..lite4)")
    p.add_argument("--scaling", choices=["official", "compound"], default="official")
    p.add_argument("--resolution", type=int, default=None, help="count FLOPs at this resolution instead")
    p.add_argument("--format", choices=["table", "csv", "json"], default="table")
    p.set_defaults(func=_run_info)


def _parse_phi(text: str):
    # "0" -> 0, as a Python caller writes it (a job's configuration, which keys resumable parts, is the same).
    for number in (int, float):
        try:
            return number(text)
        except ValueError:
            pass
    return text


def _run_info(args) -> int:
    from .jobs.info import family_table, render

    phis = [_parse_phi(p) for p in args.phi] if args.phi else None
    table = family_table(phis, scaling=args.scaling, resolution=args.resolution)
    print(render(table, args.format))
    return 0


def _add_featurize(sub) -> None:
    p = sub.add_parser("featurize", help="images (directory, glob, CSV/parquet column) -> parquet of features keyed by path")
    p.add_argument("source", help="a directory, a glob pattern (quote it), or a .csv/.parquet table")
    p.add_argument("output", help="the parquet file to write")
    p.add_argument("--phi", default=None, help="variant name or phi (default: EfficientNetFeaturizer's default phi)")
    p.add_argument("--weights", default="imagenet", help="'imagenet', 'none', or a checkpoint path")
    p.add_argument("--scaling", choices=["official", "compound"], default="official")
    p.add_argument("--pooling", default="avg", choices=["avg", "max", "avgmax", "gem"])
    p.add_argument("--resolution", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto")
    p.add_argument("--path-column", default="path", help="path column of a CSV/parquet source")
    p.add_argument("--chunk-size", type=int, default=512, help="paths per resumable part")
    p.add_argument("--no-resume", action="store_true", help="recompute parts left by an interrupted run")
    p.add_argument("--on-error", choices=["raise", "skip", "nan"], default="raise",
                   help="an image that cannot be read: stop with an error naming it (default), leave its row out, "
                   "or give it NaN features; skipped and NaN rows are listed on stderr and in the file's metadata")
    p.add_argument("--dask", metavar="SCHEDULER", default=None,
                   help="run the chunks on a Dask cluster: a scheduler address (tcp://host:8786) or scheduler file "
                   "(.json); the workers must see the image paths (needs effsk[dask])")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_run_featurize)


def _run_featurize(args) -> int:
    from .estimators import EfficientNetFeaturizer
    from .jobs.featurize import featurize_to_parquet

    featurizer = EfficientNetFeaturizer(
        EfficientNetFeaturizer().phi if args.phi is None else _parse_phi(args.phi),  # the estimator's own default
        weights=None if args.weights.lower() == "none" else args.weights,
        scaling=args.scaling,
        pooling=args.pooling,
        resolution=args.resolution,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        device=args.device,
        precision=args.precision,
        verbose=0,
    )
    out = featurize_to_parquet(
        args.source,
        args.output,
        featurizer=featurizer,
        path_column=args.path_column,
        chunk_size=args.chunk_size,
        resume=not args.no_resume,
        on_error=args.on_error,
        dask=args.dask,
        verbose=0 if args.quiet else 1,
    )
    _report_failures(out)
    print(f"wrote {out}")
    return 0


_LISTED_FAILURES = 20


def _report_failures(output: str) -> None:
    """List (on stderr) the images a run skipped or gave NaN rows; the file's metadata lists them all."""
    from .jobs.featurize import read_metadata

    meta = read_metadata(output)
    failures = meta.get("failures", [])
    if not failures:
        return
    what = "left out" if meta["on_error"] == "skip" else "NaN rows"
    lines = [f"effsk featurize: {len(failures)} of {meta['n_images']} images could not be read ({what}):"]
    lines += [f"  {f['path']}: {f['reason']}" for f in failures[:_LISTED_FAILURES]]
    if len(failures) > _LISTED_FAILURES:
        lines.append(f"  ... and {len(failures) - _LISTED_FAILURES} more")
    lines.append(f"  (all of them: effsk.jobs.featurize.read_metadata({output!r})['failures'])")
    print("\n".join(lines), file=sys.stderr)


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="the design card's pipeline on sklearn's digits with real Lite0 weights (offline)")
    p.add_argument("--phi", default="lite0", help="variant name or phi (default: lite0, whose weights ship with effsk)")
    p.add_argument("--weights", default="imagenet", help="'imagenet', 'none', or a checkpoint path")
    p.add_argument("--n", type=int, default=None, help="use only the first N digits (default: all 1797)")
    p.add_argument("--resolution", type=int, default=128,
                   help="input resolution (default 128; the README's block uses 64, which is 5x faster and about 2 points "
                   "less accurate here; 224 costs 3x the time of 128 for the same accuracy)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_run_demo)


def _run_demo(args) -> int:
    from .jobs.demo import run_demo

    run_demo(
        _parse_phi(args.phi),
        None if args.weights.lower() == "none" else args.weights,
        n=args.n,
        resolution=args.resolution,
        batch_size=args.batch_size,
        verbose=0 if args.quiet else 1,
    )
    return 0


def _add_pretrain(sub) -> None:
    p = sub.add_parser(
        "pretrain",
        help="train a backbone from scratch (or continue from weights) on an ImageFolder or a CSV/parquet table",
        description="Pretrain an EfficientNet. Under torchrun --nproc_per_node=N it runs data-parallel "
        "(DDP; NCCL on GPUs, gloo on CPU); --batch-size is the global batch.",
    )
    p.add_argument("data", help="an ImageFolder directory (one folder per class) or a .csv/.parquet table")
    p.add_argument("--output-dir", required=True, help="where the checkpoint, training state, metrics and plot go")
    p.add_argument("--phi", default="b0", help="variant name or phi (default: b0)")
    p.add_argument("--recipe", default="modern", choices=["modern", "paper"])
    p.add_argument("--val-data", default=None, help="validation directory or table (same classes)")
    p.add_argument("--val-fraction", type=float, default=0.0, help="hold out this fraction of DATA when there is no --val-data")
    p.add_argument("--weights", default="none", help="'none' (from scratch), 'imagenet', or a checkpoint path to continue from")
    p.add_argument("--epochs", type=int, default=None, help="default: the recipe's")
    p.add_argument("--batch-size", type=int, default=256, help="global batch (default: 256)")
    p.add_argument("--lr", type=float, default=None, help="default: the recipe's lr per 256 images x batch/256")
    p.add_argument("--resolution", type=int, default=None, help="crop size (default: the variant's)")
    p.add_argument("--scaling", choices=["official", "compound"], default="official")
    p.add_argument("--path-column", default="path")
    p.add_argument("--label-column", default="label")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="NAME=VALUE",
                   help="override a recipe setting, e.g. --set optimizer=sgd --set ema_decay=None (repeatable)")
    p.add_argument("--resume", nargs="?", const="true", default="false", choices=["true", "auto", "false"],
                   help="continue the run in --output-dir ('auto': if there is one)")
    p.add_argument("--save-every-steps", type=int, default=None, help="also save the training state every N steps")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--compile", action="store_true", help="torch.compile the training forward pass")
    p.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across GPUs under torchrun")
    p.add_argument("--num-workers", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_run_pretrain)


def _parse_override(text: str) -> tuple[str, object]:
    import ast

    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise ValueError(f"--set {text!r}: expected NAME=VALUE")
    try:
        parsed = ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
        parsed = value.strip()  # a bare word such as adamw or cosine
    return name.strip(), parsed


def _run_pretrain(args) -> int:
    from .training.pretraining import Recipe, pretrain

    overrides = dict(_parse_override(item) for item in args.overrides)
    unknown = sorted(set(overrides) - set(Recipe.names()))
    if unknown:
        raise ValueError(f"--set {unknown[0]}: not a recipe setting; valid settings: {', '.join(Recipe.names())}")
    result = pretrain(
        args.data,
        output_dir=args.output_dir,
        phi=_parse_phi(args.phi),
        recipe=args.recipe,
        val_data=args.val_data,
        val_fraction=args.val_fraction,
        weights=None if args.weights.lower() == "none" else args.weights,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        resolution=args.resolution,
        scaling=args.scaling,
        path_column=args.path_column,
        label_column=args.label_column,
        resume={"true": True, "auto": "auto", "false": False}[args.resume],
        save_every_steps=args.save_every_steps,
        device=args.device,
        precision=args.precision,
        channels_last=args.channels_last,
        compile=args.compile,
        sync_bn=args.sync_bn,
        num_workers=args.num_workers,
        seed=args.seed,
        verbose=0 if args.quiet else 1,
        **overrides,
    )
    from .training.distributed import from_environ

    if from_environ().is_main:
        print(f"wrote {result.checkpoint}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="effsk", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_info(sub)
    _add_featurize(sub)
    _add_demo(sub)
    _add_pretrain(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        print(f"effsk {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
