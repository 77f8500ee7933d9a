"""The `meshscale` command line: the top-level parser, ``-v`` and dispatch to a subcommand.

Each subcommand lives in its own module under `meshscale.app.commands` (``add`` defines
its arguments, ``run`` does the work); a new one is a module appended to `COMMANDS`.
Nothing here starts the JAX backend: `--devices N` asks XLA for N simulated CPU devices
through ``XLA_FLAGS``, which XLA reads once, when the backend starts, so every command
sets its device environment (`meshscale.runtime.simulated`) first and imports inside.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from meshscale.app.commands import demo, launch, ray_demo, report, search
from meshscale.app.commands.search import _counts
from meshscale.runtime.simulated import DEVICE_COUNT_FLAG, device_environment

# re-exported: tests and callers import these from here
__all__ = ["COMMANDS", "DEVICE_COUNT_FLAG", "_counts", "build_parser", "device_environment",
           "main"]

COMMANDS = [search, demo, report, launch, ray_demo]  # parser order: `meshscale --help`


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meshscale", description="Re-parallelize JAX training when its devices change.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        command.add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The `meshscale` console entry point; returns the exit status (2: a usage error)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args)
    except Exception as e:
        from meshscale.errors import MeshscaleError

        if isinstance(e, MeshscaleError):
            print(f"meshscale {args.command}: error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
