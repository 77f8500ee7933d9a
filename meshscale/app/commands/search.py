"""`meshscale search`: try-run every candidate mesh for a model and say which trains fastest."""

from __future__ import annotations

import argparse
import os
import sys
import time

from meshscale.app.commands.options import positive
from meshscale.models import registry
from meshscale.runtime.simulated import device_environment


def take_devices(count: int | None):
    """The first `count` JAX devices (all when None); raises if there are fewer."""
    import jax

    from meshscale.errors import InsufficientDevices

    devices = jax.devices()
    if count is not None and count > len(devices):
        raise InsufficientDevices(
            f"asked for {count} devices, the {jax.default_backend()} backend has "
            f"{len(devices)}: lower --devices (or use --platform cpu to simulate them)")
    return devices[:count] if count else devices


def _model(text: str) -> str:
    if text in registry.NAMES or ":" in text:
        return text
    raise argparse.ArgumentTypeError(
        f"--model takes one of {', '.join(registry.NAMES)} or package.module:factory, "
        f"got {text!r}")


def build_model(name: str, seed: int):
    """(model, batch_fn) for a model name; ``batch_fn(batch_size, i)`` is host batch i."""
    return registry.build(name, seed)


def _p_min(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return positive(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"--p-min takes an int or 'auto', got {text!r}") from None


def _counts(flag: str, example: str):
    """Parser of a search-space flag: auto (None), all, or a comma-separated list."""
    def parse(text: str):
        if text in ("auto", "all"):
            return None if text == "auto" else "all"
        try:
            values = [int(v) for v in text.split(",") if v.strip()]
        except ValueError:
            values = []
        if not values or min(values) < 1:
            raise argparse.ArgumentTypeError(
                f"{flag} takes auto, all or a list like {example}; got {text!r}")
        return values
    return parse


def add(subparsers) -> None:
    from meshscale.layout.sharding import STATE_SHARDINGS
    from meshscale.training.timing import Timing

    timing = Timing()
    p = subparsers.add_parser(
        "search", help="try-run every candidate mesh and say which trains fastest",
        description="Try-run every candidate mesh for a model on N devices (simulated CPU "
                    "devices by default) and decide whether switching to the best pays.")
    p.add_argument("--model", type=_model, default="gpt-tiny",
                   help=f"{', '.join(registry.NAMES)}, or package.module:factory "
                        "(your own model)")
    p.add_argument("--devices", type=int, default=8, help="devices to use (default 8)")
    p.add_argument("--platform", choices=("cpu", "auto"), default="cpu",
                   help="cpu: simulate --devices CPU devices; auto: JAX's own devices")
    p.add_argument("--p-min", type=_p_min, default=1,
                   help="fewest pipeline stages, or 'auto' (needs a memory budget)")
    p.add_argument("--device-memory", default=None,
                   help="per-device memory budget, e.g. 2GiB (CPU reports none)")
    p.add_argument("--batch", type=int, default=32, help="global batch (fixed across meshes)")
    p.add_argument("--current", default=None,
                   help="the running mesh, e.g. 2x2/m2: its baseline is measured first")
    p.add_argument("--max-pipe", type=int, default=None)
    p.add_argument("--microbatches", type=_counts("--microbatches", "2,4,8"), default=None,
                   help="auto (one count per mesh), all (near p, 2p, 4p) or a list like 2,4")
    p.add_argument("--repeats", type=_counts("--repeats", "1,2"), default=None,
                   help="circular-schedule rounds: auto (1: plain GPipe), all (1, 2, 4) or "
                        "a list like 1,2")
    p.add_argument("--warmup", type=int, default=timing.warmup)
    p.add_argument("--steps", type=int, default=timing.steps, help="timed steps per try-run")
    p.add_argument("--threshold", type=float, default=0.05)
    p.add_argument("--eps", type=float, default=0.05)
    p.add_argument("--remaining-steps", type=int, default=None)
    p.add_argument("--switch-cost", type=float, default=None, help="seconds a switch costs")
    p.add_argument("--run-dir", default=None,
                   help="JAX's persistent compilation cache goes to RUN_DIR/jax_cache")
    p.add_argument("--json", dest="json_path", default=None, help="also write the result here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--state-sharding", choices=STATE_SHARDINGS, default="fsdp",
                   help="where parameters and optimizer state live besides their stage")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    with device_environment(args.devices, args.platform):
        import optax
        from rich.console import Console

        from meshscale import SearchSpace, Timing, Trainer, search
        from meshscale.app import report
        from meshscale.layout.mesh import MeshShape
        from meshscale.planning.memory import format_bytes, memory_budget, resolve_p_min
        from meshscale.planning.space import candidates, require_devices

        console = Console(width=None if sys.stdout.isatty() else 120)
        devices = take_devices(args.devices)
        if args.p_min != "auto":
            require_devices(len(devices), args.p_min)  # before the slow part
        model, batch_fn = build_model(args.model, args.seed)
        trainer = Trainer(model, optax.adam(1e-3), global_batch=args.batch,
                          state_sharding=args.state_sharding)
        batches = [batch_fn(args.batch, i) for i in range(args.warmup + args.steps)]
        budget = memory_budget(devices, args.device_memory)
        cache_dir = os.path.join(args.run_dir, "jax_cache") if args.run_dir else None
        p_min = resolve_p_min(trainer, devices, args.p_min, budget)
        current = MeshShape.parse(args.current) if args.current else None
        if current is not None:
            state, baseline = measure_baseline(trainer, batches, current, devices,
                                               warmup=args.warmup, steps=args.steps)
        else:  # start-up: the live state sits on the first candidate mesh
            first = candidates(len(devices), p_min=p_min, num_layers=trainer.num_layers,
                               global_batch=args.batch, max_pipe=args.max_pipe)
            state = trainer.init_state(first[0].shape if first else MeshShape(1, 1), devices)
            baseline = None
        space = SearchSpace(p_min=p_min, max_pipe=args.max_pipe, microbatches=args.microbatches,
                            repeats=args.repeats, memory_budget=budget)
        start = time.perf_counter()
        decision = search(
            trainer, state, batches, devices, space=space,
            timing=Timing(warmup=args.warmup, steps=args.steps), baseline=baseline,
            threshold=args.threshold, current=current, remaining_steps=args.remaining_steps,
            switch_cost=args.switch_cost, eps=args.eps, compile_cache_dir=cache_dir)
        seconds = time.perf_counter() - start
        title = (f"meshscale search: {args.model}, {len(devices)} devices, batch {args.batch}, "
                 f"p_min {p_min}, budget {format_bytes(budget)}")
        console.print(report.tryrun_table(report.to_plain(decision), title=title))
        words = describe(decision, len(devices), eps=args.eps)
        console.print(words)
        console.print(f"search took {seconds:.1f} s")
        if args.json_path:
            report.write_json(report.to_plain({
                "command": "search", "model": args.model, "num_devices": len(devices),
                "device_kind": devices[0].device_kind, "global_batch": args.batch,
                "memory_budget": budget, "search_seconds": seconds, "words": words,
                "decision": decision}), args.json_path)
            console.print(f"wrote {args.json_path}")
    return 0


def describe(decision, num_devices: int, *, eps: float) -> str:
    """The decision in words: what to do, why, and how many devices are worth keeping."""
    words = f"{num_devices} devices: {decision.reason}"
    if decision.max_useful_devices is not None:
        words += (f". Maximum useful devices: {decision.max_useful_devices} of {num_devices} "
                  f"(the fewest within {eps:.0%} of the best samples/s)")
    return words + "."


def measure_baseline(trainer, batches, shape, devices, *, warmup: int, steps: int):
    """(live state, baseline) from ordinary training steps on `shape`: `warmup` untimed
    steps (the first compiles), then `steps` timed by the one step timer."""
    from meshscale import Baseline
    from meshscale.training.timing import time_steps

    state = trainer.init_state(shape, devices)

    def run_one(i: int):
        nonlocal state
        compiled = trainer.compile_step(shape, devices)
        batch = trainer.put_batch(batches[i % len(batches)], shape, devices)
        state, metrics = compiled(state, batch)
        return metrics

    times = time_steps(run_one, warmup=warmup, steps=steps)
    return state, Baseline.from_step_times(times, trainer.global_batch, shape, skip=0)
