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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="effsk", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_info(sub)
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
