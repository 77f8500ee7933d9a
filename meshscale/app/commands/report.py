"""`meshscale report`: re-render a run's tables and report.png from its report.json."""

from __future__ import annotations

import argparse
import sys


def add(subparsers) -> None:
    p = subparsers.add_parser("report", help="re-render a run's tables and report.png",
                              description="Re-render RUN_DIR/report.png and the terminal "
                                          "tables from RUN_DIR/report.json.")
    p.add_argument("run_dir", help="a run directory holding report.json (e.g. runs/demo)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from meshscale.app import report

    try:
        json_path, png = report.render(args.run_dir)
    except FileNotFoundError as e:
        print(f"meshscale report: error: {e}", file=sys.stderr)
        return 2
    print(f"re-rendered {png} from {json_path}")
    return 0
