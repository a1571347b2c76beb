"""Command line: ``longctx <command>`` (also ``python -m longctx``)."""

from __future__ import annotations

import argparse
import sys

from . import demo
from .train import cli as train_cli


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="longctx", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo_parser = sub.add_parser(
        "demo", help="CP attention on a simulated CPU mesh, checked against the reference"
    )
    demo.add_arguments(demo_parser)
    train_parser = sub.add_parser(
        "train", help="train a model from a YAML config (default: the tiny CPU run)",
        description=train_cli.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train_cli.add_arguments(train_parser)
    args = parser.parse_args(argv)
    if args.command == "train":
        return train_cli.run_from_args(args)
    try:
        if args.command == "demo":
            return 0 if demo.run_demo(demo.config_from_args(args)) else 1
    except (ValueError, FileNotFoundError) as e:
        print(f"longctx {args.command}: error: {e}", file=sys.stderr)
        return 2
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
