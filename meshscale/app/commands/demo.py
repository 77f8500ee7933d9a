"""`meshscale demo`: train a GPT on stdlib text while the device count changes."""

from __future__ import annotations

import argparse
import sys

from meshscale.app.commands.options import DEFAULTS, add_model_options, add_run_options, positive
from meshscale.runtime.simulated import device_environment


def add(subparsers) -> None:
    from meshscale.app.demo import DemoConfig

    d = DemoConfig()
    p = subparsers.add_parser(
        "demo", help="train a GPT on stdlib text while the device count changes",
        description="An ordinary ElasticTrainer run on simulated CPU devices, driven by a "
                    "device file the demo rewrites on --schedule; writes RUN_DIR/report.json, "
                    "RUN_DIR/report.png, RUN_DIR/metrics.jsonl and TensorBoard files in "
                    "RUN_DIR/tensorboard, and ends with the run's goodput. Ctrl-C saves the "
                    "step and prints the command that resumes it.")
    add_run_options(p, d, schedule_help="device counts over the run, DEVICES@STEP,...")
    add_model_options(p)
    p.add_argument("--devices", type=positive, default=DEFAULTS.devices,
                   help="simulated CPU devices in the pool (the most --schedule may grant)")
    p.add_argument("--check-every", type=positive, default=d.check_every,
                   help="poll the device file every this many steps (a change is seen at "
                        "the next poll)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in RUN_DIR from its last checkpoint (refused when "
                        "RUN_DIR holds no checkpoint)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from meshscale.app.demo import DemoConfig, parse_schedule

    try:
        parse_schedule(args.schedule, max_devices=args.devices)
    except ValueError as e:
        print(f"meshscale demo: error: {e}", file=sys.stderr)
        return 2
    with device_environment(args.devices, "cpu"):
        from meshscale.app import demo
        from meshscale.errors import Interrupted

        try:
            demo.run(DemoConfig(steps=args.steps, schedule=args.schedule, devices=args.devices,
                                p_min=args.p_min, model=args.model, run_dir=args.run_dir,
                                seed=args.seed, resume=args.resume, overwrite=args.overwrite,
                                global_batch=args.batch, check_every=args.check_every,
                                checkpoint_every=args.checkpoint_every,
                                state_sharding=args.state_sharding))
        except Interrupted as e:  # saved, and the resume line printed: 128 + signal
            return e.code
    return 0
