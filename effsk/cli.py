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
    try:
        return float(text)
    except ValueError:
        return text


def _run_info(args) -> int:
    from .info import family_table, render

    phis = [_parse_phi(p) for p in args.phi] if args.phi else None
    table = family_table(phis, scaling=args.scaling, resolution=args.resolution)
    print(render(table, args.format))
    return 0


def _add_featurize(sub) -> None:
    p = sub.add_parser("featurize", help="images (directory, glob, CSV/parquet column) -> parquet of features keyed by path")
    p.add_argument("source", help="a directory, a glob pattern (quote it), or a .csv/.parquet table")
    p.add_argument("output", help="the parquet file to write")
    p.add_argument("--phi", default="lite0", help="variant name or phi (default: lite0, whose weights ship with effsk)")
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
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_run_featurize)


def _run_featurize(args) -> int:
    from .estimators import EfficientNetFeaturizer
    from .featurize import featurize_to_parquet

    featurizer = EfficientNetFeaturizer(
        _parse_phi(args.phi),
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
        verbose=0 if args.quiet else 1,
    )
    print(f"wrote {out}")
    return 0


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="the design card's pipeline on sklearn's digits with real Lite0 weights (offline)")
    p.add_argument("--phi", default="lite0", help="variant name or phi (default: lite0, whose weights ship with effsk)")
    p.add_argument("--weights", default="imagenet", help="'imagenet', 'none', or a checkpoint path")
    p.add_argument("--n", type=int, default=None, help="use only the first N digits (default: all 1797)")
    p.add_argument("--resolution", type=int, default=None, help="override the model's input resolution")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_run_demo)


def _run_demo(args) -> int:
    from .demo import run_demo

    run_demo(
        _parse_phi(args.phi),
        None if args.weights.lower() == "none" else args.weights,
        n=args.n,
        resolution=args.resolution,
        batch_size=args.batch_size,
        verbose=0 if args.quiet else 1,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="effsk", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_info(sub)
    _add_featurize(sub)
    _add_demo(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as exc:
        print(f"effsk {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
