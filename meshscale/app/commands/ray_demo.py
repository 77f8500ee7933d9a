"""`meshscale ray-demo`: an elastic Ray Train job on a local cluster whose nodes come and go."""

from __future__ import annotations

import argparse
import sys

from meshscale.app.commands.options import (
    DEFAULTS,
    Refuse,
    add_model_options,
    add_run_options,
    positive,
)


def add(subparsers) -> None:
    from meshscale.app.ray_demo import RayDemoConfig

    d = RayDemoConfig()
    p = subparsers.add_parser(
        "ray-demo", help="an elastic Ray Train job on a local cluster whose nodes come and go",
        description="Start a local Ray cluster, run an ElasticTrainer loop as Ray Train's "
                    "elastic JaxTrainer (meshscale.integrations.ray), add and remove a node "
                    "as --schedule says, and print every restart, search and decision. It "
                    "schedules workers (each with --devices-per-worker simulated CPU "
                    "devices), not devices. Needs the ray extra: pip install 'meshscale[ray]'.")
    add_run_options(p, d, schedule_help="Ray workers over the run, WORKERS@STEP,...")
    add_model_options(p, model=DEFAULTS.ray_model)
    p.add_argument("--devices-per-worker", type=positive, default=d.devices_per_worker,
                   help="simulated CPU devices per Ray worker")
    p.add_argument("--devices", action=Refuse,
                   fix="ray-demo schedules workers, not devices: give each worker devices "
                       "with --devices-per-worker N, and the workers over time with "
                       "--schedule WORKERS@STEP,...")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from meshscale.app import ray_demo

    try:
        ray_demo.parse_schedule(args.schedule)
    except ValueError as e:
        print(f"meshscale ray-demo: error: {e}", file=sys.stderr)
        return 2
    try:
        ray_demo.run(ray_demo.RayDemoConfig(
            steps=args.steps, schedule=args.schedule, devices_per_worker=args.devices_per_worker,
            p_min=args.p_min, model=args.model, run_dir=args.run_dir, seed=args.seed,
            global_batch=args.batch, checkpoint_every=args.checkpoint_every,
            state_sharding=args.state_sharding, overwrite=args.overwrite))
    except ImportError as e:
        print(f"meshscale ray-demo: error: {e}", file=sys.stderr)
        return 2
    return 0
