"""The `meshscale` command line: one subcommand per task (`search` here; more register below).

Nothing at module level imports jax or the rest of meshscale's core: `--devices N` asks
XLA for N simulated CPU devices through ``XLA_FLAGS``, which XLA reads once, when the JAX
backend starts, so every command sets its device environment first and imports inside.
A new subcommand is a function ``add_NAME(subparsers)`` appended to `COMMANDS`.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence

MODELS = ("gpt-tiny", "gpt-small", "llama-tiny", "mlp")  # models.registry.NAMES, no jax import
DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


# -- devices -----------------------------------------------------------------------------
@contextlib.contextmanager
def device_environment(count: int | None, platform: str) -> Iterator[None]:
    """Within: ``count`` simulated CPU devices (platform "cpu"), or the real ones ("auto").

    Must be entered before the JAX backend starts (it cannot change a started one); the
    environment is restored on exit so a caller's later subprocesses see their own.
    """
    saved = {k: os.environ.get(k) for k in ("XLA_FLAGS", "JAX_PLATFORMS")}
    try:
        if platform == "cpu":
            os.environ["JAX_PLATFORMS"] = "cpu"
            if count:
                flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
                         if not f.startswith(DEVICE_COUNT_FLAG)]
                os.environ["XLA_FLAGS"] = " ".join([*flags, f"{DEVICE_COUNT_FLAG}={count}"])
            if "jax" in sys.modules:  # imported (not started) before us: env was read already
                import jax

                if jax.config.jax_platforms != "cpu":
                    jax.config.update("jax_platforms", "cpu")
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


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


# -- models ------------------------------------------------------------------------------
def _model(text: str) -> str:
    if text in MODELS or ":" in text:
        return text
    raise argparse.ArgumentTypeError(
        f"--model takes one of {', '.join(MODELS)} or package.module:factory, got {text!r}")


def build_model(name: str, seed: int):
    """(model, batch_fn) for a model name; ``batch_fn(batch_size, i)`` is host batch i."""
    from meshscale.models import registry

    return registry.build(name, seed)


# -- search ------------------------------------------------------------------------------
def _p_min(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return _positive(text)
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


def add_search(subparsers) -> None:
    p = subparsers.add_parser(
        "search", help="try-run every candidate mesh and say which trains fastest",
        description="Try-run every candidate mesh for a model on N devices (simulated CPU "
                    "devices by default) and decide whether switching to the best pays.")
    p.add_argument("--model", type=_model, default="gpt-tiny",
                   help=f"{', '.join(MODELS)}, or package.module:factory (your own model)")
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
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5, help="timed steps per try-run")
    p.add_argument("--threshold", type=float, default=0.05)
    p.add_argument("--eps", type=float, default=0.05)
    p.add_argument("--remaining-steps", type=int, default=None)
    p.add_argument("--switch-cost", type=float, default=None, help="seconds a switch costs")
    p.add_argument("--run-dir", default=None,
                   help="JAX's persistent compilation cache goes to RUN_DIR/jax_cache")
    p.add_argument("--json", dest="json_path", default=None, help="also write the result here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--state-sharding", choices=("replicate", "zero1", "fsdp"), default="fsdp",
                   help="where parameters and optimizer state live besides their stage")
    p.set_defaults(run=run_search)


def run_search(args: argparse.Namespace) -> int:
    with device_environment(args.devices, args.platform):
        import optax
        from rich.console import Console

        from meshscale import Trainer, search
        from meshscale.app import report
        from meshscale.layout.mesh import MeshShape
        from meshscale.planning.memory import format_bytes, memory_budget
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
        start = time.perf_counter()
        decision = search(
            trainer, state, batches, devices, p_min=p_min, baseline=baseline,
            threshold=args.threshold, current=current, max_pipe=args.max_pipe,
            microbatches=args.microbatches, repeats=args.repeats, warmup=args.warmup,
            steps=args.steps,
            remaining_steps=args.remaining_steps, switch_cost=args.switch_cost, eps=args.eps,
            memory_budget=budget, compile_cache_dir=cache_dir)
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


def resolve_p_min(trainer, devices, p_min: int | str, budget: int | None) -> int:
    """`p_min` itself, or for "auto" the smallest pipe width that fits `budget`."""
    from meshscale.errors import MeshscaleError
    from meshscale.planning.memory import auto_p_min

    if p_min != "auto":
        return p_min
    if budget is None:
        raise MeshscaleError("--p-min auto needs a memory budget and this backend reports "
                             "none: pass --device-memory, e.g. --device-memory 2GiB")
    return auto_p_min(trainer, devices, budget=budget)


def measure_baseline(trainer, batches, shape, devices, *, warmup: int, steps: int):
    """(live state, baseline) from ordinary training steps on `shape` (warm-up excluded)."""
    import jax

    from meshscale import Baseline

    state = trainer.init_state(shape, devices)
    times = []
    for i in range(warmup + steps):
        tick = time.perf_counter()  # the first step includes compiling; skipped below
        compiled = trainer.compile_step(shape, devices)
        batch = trainer.put_batch(batches[i % len(batches)], shape, devices)
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - tick)
    return state, Baseline.from_step_times(times, trainer.global_batch, shape, skip=warmup)


# -- demo and report ---------------------------------------------------------------------
def add_demo(subparsers) -> None:
    from meshscale.app.demo import DEFAULT_SCHEDULE, DemoConfig

    d = DemoConfig()
    p = subparsers.add_parser(
        "demo", help="train a GPT on stdlib text while the device count changes",
        description="An ordinary ElasticTrainer run on simulated CPU devices, driven by a "
                    "device file the demo rewrites on --schedule; writes RUN_DIR/report.json "
                    "and RUN_DIR/report.png.")
    _add_run_options(p, d, schedule_help=f"DEVICES@STEP,... (default {DEFAULT_SCHEDULE})")
    p.add_argument("--devices", type=_positive, default=d.devices,
                   help="simulated CPU devices in the pool (default 8)")
    p.add_argument("--model", choices=("gpt-tiny", "llama-tiny", "mlp"), default=d.model)
    p.add_argument("--state-sharding", choices=("replicate", "zero1", "fsdp"),
                   default=d.state_sharding, help="where parameters and optimizer state live")
    p.add_argument("--check-every", type=_positive, default=d.check_every,
                   help="poll the device file every this many steps")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in RUN_DIR from its last checkpoint (default: off; "
                        "refused when RUN_DIR holds no checkpoint)")
    p.set_defaults(run=run_demo)


def _add_run_options(p: argparse.ArgumentParser, d, *, schedule_help: str) -> None:
    """The options `demo` and `ray-demo` share, with defaults from their config `d`."""
    p.add_argument("--steps", type=_positive, default=d.steps)
    p.add_argument("--schedule", default=d.schedule, help=schedule_help)
    p.add_argument("--p-min", type=_positive, default=d.p_min)
    p.add_argument("--run-dir", default=d.run_dir,
                   help=f"where the run writes everything: checkpoints, report, compile cache "
                        f"(default {d.run_dir}; refused when it holds anything, unless "
                        f"{'--resume or ' if hasattr(d, 'resume') else ''}--overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in a RUN_DIR that holds a previous run or other files: "
                        "it is first moved aside to RUN_DIR.old-N, nothing is deleted "
                        "(default: off)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--batch", type=_positive, default=d.global_batch, help="global batch")
    p.add_argument("--checkpoint-every", type=_positive, default=d.checkpoint_every)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {value}")
    return value


def run_demo(args: argparse.Namespace) -> int:
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


def add_report(subparsers) -> None:
    p = subparsers.add_parser("report", help="re-render a run's tables and report.png",
                              description="Re-render RUN_DIR/report.png and the terminal "
                                          "tables from RUN_DIR/report.json.")
    p.add_argument("run_dir")
    p.set_defaults(run=run_report)


def run_report(args: argparse.Namespace) -> int:
    from meshscale.app import report

    try:
        json_path, png = report.render(args.run_dir)
    except FileNotFoundError as e:
        print(f"meshscale report: error: {e}", file=sys.stderr)
        return 2
    print(f"re-rendered {png} from {json_path}")
    return 0


# -- launch ------------------------------------------------------------------------------
def add_launch(subparsers) -> None:
    p = subparsers.add_parser(
        "launch", help="run a script as several JAX processes on this machine",
        description="Start PROCESSES copies of `python SCRIPT ARGS` as one multi-process JAX "
                    "job on this machine (loopback coordinator, simulated CPU devices, gloo "
                    "collectives); the script calls meshscale.runtime.distributed.initialize(). "
                    "Output is prefixed [pK]; if one process fails the others are stopped.")
    p.add_argument("--processes", type=_positive, default=2)
    p.add_argument("--devices-per-process", type=_positive, default=4)
    p.add_argument("--timeout", type=float, default=None, help="seconds before all are stopped")
    p.add_argument("--port", type=int, default=None, help="coordinator port (default: a free one)")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- SCRIPT ARGS")
    p.set_defaults(run=run_launch)


def run_launch(args: argparse.Namespace) -> int:
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


# -- ray-demo ----------------------------------------------------------------------------
def add_ray_demo(subparsers) -> None:
    from meshscale.app.ray_demo import DEFAULT_SCHEDULE, RayDemoConfig

    d = RayDemoConfig()
    p = subparsers.add_parser(
        "ray-demo", help="an elastic Ray Train job on a local cluster whose nodes come and go",
        description="Start a local Ray cluster, run an ElasticTrainer loop as Ray Train's "
                    "elastic JaxTrainer (meshscale.integrations.ray), add and remove a node "
                    "as --schedule says, and print every restart, search and decision. "
                    "Needs the ray extra: pip install 'meshscale[ray]'.")
    _add_run_options(p, d, schedule_help=f"WORKERS@STEP,... (default {DEFAULT_SCHEDULE})")
    p.add_argument("--devices-per-worker", type=_positive, default=d.devices_per_worker,
                   help="simulated CPU devices per Ray worker")
    p.add_argument("--model", choices=MODELS, default=d.model)
    p.set_defaults(run=run_ray_demo)


def run_ray_demo(args: argparse.Namespace) -> int:
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
            overwrite=args.overwrite))
    except ImportError as e:
        print(f"meshscale ray-demo: error: {e}", file=sys.stderr)
        return 2
    return 0


# -- entry point -------------------------------------------------------------------------
COMMANDS: list[Callable] = [add_search, add_demo, add_report, add_launch, add_ray_demo]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meshscale", description="Re-parallelize JAX training when its devices change.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in COMMANDS:
        add(subparsers)
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
