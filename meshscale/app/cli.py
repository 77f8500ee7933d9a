"""The `meshscale` command line: the top-level parser, ``-v``/``-q`` and dispatch to a
subcommand.

Each subcommand lives in its own module under `meshscale.app.commands` (``add`` defines
its arguments, ``run`` does the work); a new one is a module appended to `COMMANDS`.
Every parser is an `options.Parser`: each option's help shows its default, and no flag is
taken for a longer one (``ray-demo --devices`` is refused, not read as
``--devices-per-worker``). Nothing here starts the JAX backend: `--devices N` asks XLA for
N simulated CPU devices through ``XLA_FLAGS``, which XLA reads once, when the backend
starts, so every command sets its device environment (`meshscale.runtime.simulated`)
first and imports inside.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from meshscale.app import terminal
from meshscale.app.commands import demo, launch, ray_demo, report, search
from meshscale.app.commands.options import Parser
from meshscale.app.commands.search import _counts
from meshscale.runtime.simulated import DEVICE_COUNT_FLAG, device_environment

# re-exported: tests and callers import these from here
__all__ = ["COMMANDS", "DEVICE_COUNT_FLAG", "_counts", "build_parser", "device_environment",
           "main"]

COMMANDS = [search, demo, report, launch, ray_demo]  # parser order: `meshscale --help`


def build_parser() -> Parser:
    parser = Parser(prog="meshscale",
                    description="Re-parallelize JAX training when its devices change.")
    _add_loudness(parser, default=False)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        command.add(subparsers)
    for sub in subparsers.choices.values():  # `meshscale search -v` works too
        _add_loudness(sub, default=argparse.SUPPRESS)  # unset: the top level's stands
    return parser


def _add_loudness(parser: Parser, *, default) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-v", "--verbose", action="store_true", default=default,
                       help="log what meshscale does: INFO lines on stderr (default: off)")
    group.add_argument("-q", "--quiet", action="store_true", default=default,
                       help="print errors and results only: no progress, tables or "
                            "warnings (default: off)")


def main(argv: Sequence[str] | None = None) -> int:
    """The `meshscale` console entry point; returns the exit status (2: a usage error)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    if args.verbose and args.quiet:
        parser.error("-v and -q together: pick one")
    restore = loudness(verbose=args.verbose, quiet=args.quiet)
    try:
        return args.run(args)
    except Exception as e:
        from meshscale.errors import MeshscaleError

        if isinstance(e, MeshscaleError):
            print(f"meshscale {args.command}: error: {e}", file=sys.stderr)
            return 2
        raise
    finally:
        restore()


def loudness(*, verbose: bool, quiet: bool):
    """Apply ``-v``/``-q``; returns the function that undoes it (for callers in-process).

    The application, not the library, configures logging: a root handler if there is
    none (the library never adds one, `meshscale._logging`), and the level of the
    ``meshscale`` logger itself, so ``-v`` shows meshscale's INFO lines whatever handler
    the root has, without other libraries' INFO. ``-q`` also quiets the terminal
    (`terminal.configure`) and other libraries' warnings.
    """
    root, ours = logging.getLogger(), logging.getLogger("meshscale")
    if not root.handlers:
        logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    levels = root.level, ours.level
    if verbose:
        ours.setLevel(logging.INFO)
    if quiet:
        ours.setLevel(logging.ERROR)
        root.setLevel(logging.ERROR)
    was_quiet = terminal.configure(quiet=quiet)

    def restore() -> None:
        root.setLevel(levels[0])
        ours.setLevel(levels[1])
        terminal.configure(quiet=was_quiet)

    return restore


if __name__ == "__main__":
    sys.exit(main())
