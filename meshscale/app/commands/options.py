"""Argument types and option groups more than one subcommand uses."""

from __future__ import annotations

import argparse


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {value}")
    return value


def add_run_options(p: argparse.ArgumentParser, d, *, schedule_help: str) -> None:
    """The options `demo` and `ray-demo` share, with defaults from their config `d`."""
    p.add_argument("--steps", type=positive, default=d.steps)
    p.add_argument("--schedule", default=d.schedule, help=schedule_help)
    p.add_argument("--p-min", type=positive, default=d.p_min)
    p.add_argument("--run-dir", default=d.run_dir,
                   help=f"where the run writes everything: checkpoints, report, compile cache "
                        f"(default {d.run_dir}; refused when it holds anything, unless "
                        f"{'--resume or ' if hasattr(d, 'resume') else ''}--overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in a RUN_DIR that holds a previous run or other files: "
                        "it is first moved aside to RUN_DIR.old-N, nothing is deleted "
                        "(default: off)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--batch", type=positive, default=d.global_batch, help="global batch")
    p.add_argument("--checkpoint-every", type=positive, default=d.checkpoint_every)
