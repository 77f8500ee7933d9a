"""`meshscale search`: try-run every candidate mesh for a model and say which trains fastest."""

from __future__ import annotations

import argparse
import os
import time

from meshscale.app.commands.options import DEFAULTS, add_model_options, positive
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
    from meshscale.training.timing import Timing

    timing = Timing()
    p = subparsers.add_parser(
        "search", help="try-run every candidate mesh and say which trains fastest",
        description="Try-run every candidate mesh for a model on N devices (simulated CPU "
                    "devices by default) and decide whether switching to the best pays; "
                    "say which meshes the rule left out and why.")
    add_model_options(p, p_min_type=_p_min,
                      p_min_help=", or auto: the fewest whose compiled step fits "
                                 "--device-memory")
    p.add_argument("--devices", type=positive, default=DEFAULTS.devices, help="devices to use")
    p.add_argument("--platform", choices=("cpu", "auto"), default="cpu",
                   help="cpu: simulate --devices CPU devices; auto: JAX's own devices")
    p.add_argument("--device-memory", default=None,
                   help="per-device memory budget, e.g. 2GiB; meshes over it are skipped "
                        "unrun (default: the backend's limit; CPU reports none)")
    p.add_argument("--current", default=None,
                   help="the running mesh, e.g. 2x2/m2: its baseline is measured first "
                        "(default: none, the start-up rule: run the fastest)")
    p.add_argument("--max-pipe", type=positive, default=None,
                   help="most pipeline stages to try (default: no bound but the devices "
                        "and layers)")
    p.add_argument("--microbatches", type=_counts("--microbatches", "2,4,8"), default=None,
                   help="auto (one count per mesh), all (near p, 2p, 4p) or a list like 2,4 "
                        "(default: auto)")
    p.add_argument("--repeats", type=_counts("--repeats", "1,2"), default=None,
                   help="circular-schedule rounds: auto (1: plain GPipe), all (1, 2, 4) or "
                        "a list like 1,2 (default: auto)")
    p.add_argument("--warmup", type=int, default=timing.warmup,
                   help="untimed steps per try-run after it compiles")
    p.add_argument("--steps", type=positive, default=timing.steps, help="timed steps per try-run")
    p.add_argument("--threshold", type=float, default=0.05,
                   help="switch only when the best beats the current mesh by more than this "
                        "fraction")
    p.add_argument("--eps", type=float, default=0.05,
                   help="maximum useful devices: the fewest within this fraction of the best "
                        "samples/s")
    p.add_argument("--remaining-steps", type=positive, default=None,
                   help="steps left to train; with --switch-cost a switch must pay for itself "
                        "(default: unknown, no payback test)")
    p.add_argument("--switch-cost", type=float, default=None,
                   help="seconds a switch costs (default: unknown, no payback test)")
    p.add_argument("--run-dir", default=None,
                   help="JAX's persistent compilation cache goes to RUN_DIR/jax_cache "
                        "(default: none, every compile is fresh)")
    p.add_argument("--top-k", type=_top_k, default="auto",
                   help="try-run only the current mesh, the k best the cost model predicts and "
                        "up to 2 uncertain ones: auto (3 when there are more candidates), "
                        "all, or a number")
    p.add_argument("--plan", action="store_true",
                   help="rank the candidates for --devices devices that need not exist "
                        "(predicted throughput and memory; nothing runs, only small abstract "
                        "compiles); --model also takes llama-8b and llama-70b (shapes only)")
    p.add_argument("--plan-backend", choices=("gpu", "tpu", "cpu"), default="gpu",
                   help="--plan: whose constants rank an uncalibrated plan (a --run-dir's "
                        "calibration, when it has one, is used instead)")
    p.add_argument("--json", dest="json_path", default=None,
                   help="also write the result to this file (default: none)")
    p.set_defaults(run=run)


def _top_k(text: str):
    if text in ("auto", "all"):
        return None if text == "all" else "auto"
    try:
        return positive(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"--top-k takes auto, all or a positive int, got {text!r}") from None


def _cost_path(args: argparse.Namespace) -> str | None:
    return os.path.join(args.run_dir, "cost_model.json") if args.run_dir else None


def run(args: argparse.Namespace) -> int:
    if args.plan:
        return plan(args)
    with device_environment(args.devices, args.platform):
        from meshscale.app import report, terminal
        from meshscale.planning.memory import format_bytes, memory_budget, resolve_p_min
        from meshscale.planning.space import require_devices

        console = terminal.console()
        devices = take_devices(args.devices)
        if args.p_min != "auto":
            require_devices(len(devices), args.p_min)  # before the slow part
        trainer, batches = _trainer_and_batches(args)
        budget = memory_budget(devices, args.device_memory)
        p_min = resolve_p_min(trainer, devices, args.p_min, budget)
        start = time.perf_counter()
        decision = _search(args, console, trainer, batches, devices, p_min, budget)
        seconds = time.perf_counter() - start
        title = (f"meshscale search: {args.model}, {len(devices)} devices, batch {args.batch}, "
                 f"p_min {p_min}, budget {format_bytes(budget)}")
        plain = report.to_plain(decision)
        console.print(report.tryrun_table(plain, title=title))
        console.print(report.prediction_table(plain["predictions"], title="cost model: "
                                              "predicted vs measured, and why the rest did "
                                              "not run"))
        words = describe(decision, len(devices), eps=args.eps)
        (print if terminal.quiet() else console.print)(words)  # -q: the result alone
        for line in ruled_out_lines(decision):
            console.print(line, markup=False, highlight=False)
        console.print(f"search took {seconds:.1f} s")
        if args.json_path:
            report.write_json(report.to_plain({
                "command": "search", "model": args.model, "num_devices": len(devices),
                "device_kind": devices[0].device_kind, "global_batch": args.batch,
                "memory_budget": budget, "search_seconds": seconds, "words": words,
                "decision": decision}), args.json_path)
            console.print(f"wrote {args.json_path}")
    return 0


def _trainer_and_batches(args: argparse.Namespace):
    """The command's `Trainer` and the host batches its try-runs cycle through."""
    import optax

    from meshscale import Trainer

    model, batch_fn = build_model(args.model, args.seed)
    trainer = Trainer(model, optax.adam(1e-3), global_batch=args.batch,
                      state_sharding=args.state_sharding)
    return trainer, [batch_fn(args.batch, i) for i in range(args.warmup + args.steps)]


def _search(args: argparse.Namespace, console, trainer, batches, devices, p_min, budget):
    """The search itself, with a progress bar per try-run (none under -q)."""
    from meshscale import SearchSpace, Timing, search
    from meshscale.app import terminal
    from meshscale.layout.mesh import MeshShape
    from meshscale.planning.cost import CostModel
    from meshscale.planning.space import candidates

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
    bar = None if terminal.quiet() else terminal.TryRunBar(console)
    cost = CostModel.load(_cost_path(args)) if args.run_dir else CostModel()
    if args.run_dir:
        os.makedirs(args.run_dir, exist_ok=True)
    try:
        return search(
            trainer, state, batches, devices, space=space,
            timing=Timing(warmup=args.warmup, steps=args.steps), baseline=baseline,
            threshold=args.threshold, current=current, remaining_steps=args.remaining_steps,
            switch_cost=args.switch_cost, eps=args.eps, progress=bar, top_k=args.top_k,
            cost_model=cost,
            compile_cache_dir=os.path.join(args.run_dir, "jax_cache") if args.run_dir else None)
    finally:
        if bar is not None:
            bar.close()
        if args.run_dir:  # the calibration stays with the run: the next search reuses it
            cost.save(_cost_path(args))


def describe(decision, num_devices: int, *, eps: float) -> str:
    """The decision in words: what to do, why, and how many devices are worth keeping."""
    words = f"{num_devices} devices: {decision.reason}"
    if decision.max_useful_devices is not None:
        words += (f". Maximum useful devices: {decision.max_useful_devices} of {num_devices} "
                  f"(the fewest within {eps:.0%} of the best samples/s)")
    return words + "."


def ruled_out_lines(decision) -> list[str]:
    """Why meshes were not tried (the rule) or did not run (memory, failures), one line
    each, under a heading; empty when every candidate ran and nothing was ruled out."""
    lines = [f"  {w}" for w in decision.ruled_out]
    lines += [f"  {r.shape}: {r.status}" for r in decision.results if not r.ok]
    return ["ruled out:", *lines] if lines else []


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


def plan(args: argparse.Namespace) -> int:
    """``search --plan``: the ranked candidates for a cluster that is not there."""
    import optax

    from meshscale import SearchSpace, Trainer
    from meshscale.app import report, terminal
    from meshscale.errors import InvalidArgument
    from meshscale.layout.mesh import MeshShape
    from meshscale.planning import rank
    from meshscale.planning.cost import CostModel
    from meshscale.planning.memory import format_bytes, parse_bytes

    if args.p_min == "auto":
        raise InvalidArgument("--plan needs an int --p-min (auto compiles every pipe width on "
                              "real devices): pass e.g. --p-min 2")
    start = time.perf_counter()
    if args.model in registry.ABSTRACT:
        model, example = registry.abstract(args.model, args.batch)
    else:
        model, batch_fn = build_model(args.model, args.seed)
        example = batch_fn(args.batch, 0)
    trainer = Trainer(model, optax.adam(1e-3), global_batch=args.batch, example_batch=example,
                      state_sharding=args.state_sharding)
    budget = parse_bytes(args.device_memory) if args.device_memory else None
    cost = CostModel.load(_cost_path(args)) if args.run_dir else None
    space = SearchSpace(p_min=args.p_min, max_pipe=args.max_pipe,
                        microbatches=args.microbatches, repeats=args.repeats)
    ranked = rank.plan(trainer, args.devices, space=space, cost_model=cost, budget=budget,
                       backend=args.plan_backend,
                       current=MeshShape.parse(args.current) if args.current else None)
    seconds = time.perf_counter() - start
    console = terminal.console()
    calibration = (f"calibrated from {len(cost.observations)} try-runs" if cost and
                   cost.observations else f"{args.plan_backend} prior constants, uncalibrated")
    console.print(report.prediction_table(report.to_plain(ranked), title=(
        f"meshscale search --plan: {args.model}, {args.devices} devices, batch {args.batch}, "
        f"p_min {args.p_min}, budget {format_bytes(budget)}; {calibration}")))
    best = next((p for p in ranked if p.rank == 1), None)
    words = (f"{args.devices} devices: {len(ranked)} candidates; predicted best {best.shape} "
             f"at {best.samples_per_second:.4g} samples/s, {format_bytes(best.bytes_per_device)}"
             f" per device" if best else f"{args.devices} devices: no candidate fits")
    (print if terminal.quiet() else console.print)(words)
    console.print(f"plan took {seconds:.1f} s")
    if args.json_path:
        report.write_json(report.to_plain({
            "command": "search --plan", "model": args.model, "num_devices": args.devices,
            "global_batch": args.batch, "memory_budget": budget, "plan_seconds": seconds,
            "words": words, "predictions": ranked}), args.json_path)
        console.print(f"wrote {args.json_path}")
    return 0
