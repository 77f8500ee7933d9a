"""`meshscale launch`: run a script as several JAX processes on this machine."""

from __future__ import annotations

import argparse
import sys

from meshscale.app.commands.options import positive


def add(subparsers) -> None:
    p = subparsers.add_parser(
        "launch", help="run a script as several JAX processes on this machine",
        description="Start PROCESSES copies of `python SCRIPT ARGS` as one multi-process JAX "
                    "job on this machine (loopback coordinator, simulated CPU devices, gloo "
                    "collectives); the script calls meshscale.runtime.distributed.initialize(). "
                    "Output is prefixed [pK]; if one process fails the others are stopped.")
    p.add_argument("--processes", type=positive, default=2, help="JAX processes to start")
    p.add_argument("--devices-per-process", type=positive, default=4,
                   help="simulated CPU devices each process sees")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds before all are stopped (default: no limit)")
    p.add_argument("--port", type=int, default=None,
                   help="coordinator port (default: a free one)")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- SCRIPT ARGS",
                   help="the script every process runs, and its arguments")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from meshscale.runtime.launch import launch

    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        print("meshscale launch: error: name a script: meshscale launch -- train.py ARGS",
              file=sys.stderr)
        return 2
    status = launch(command, processes=args.processes,
                    devices_per_process=args.devices_per_process, timeout=args.timeout,
                    port=args.port)
    return status if status >= 0 else 128 - status  # killed by signal N: 128 + N
