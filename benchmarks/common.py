"""Shared bits of the benchmark scripts: simulated devices, timing, a markdown table."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Sequence


def simulate_devices(n: int = 8) -> None:
    """Ask XLA for `n` host devices; must run before jax is imported."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


def median_seconds(run: Callable[[], object], *, warmup: int = 2, repeats: int = 10) -> float:
    """Median wall time of `run()` (which must block until its result is ready)."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved(runs: dict[str, Callable[[], object]], *, rounds: int,
                warmup: int = 1) -> dict[str, list[float]]:
    """Wall seconds of every run, round by round, the runs taking turns.

    Each `run()` must block until its work is done. Within a round the runs go in turn,
    in reverse order every other round (A B, B A, ...), so a drift of the machine's load
    (the other jobs on shared cores, turbo, caches) falls on every side alike: a ratio
    is only worth printing when both sides were timed this way, in one run.
    """
    for _ in range(warmup):
        for run in runs.values():
            run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(rounds):
        order = list(runs.items())
        for name, run in order if r % 2 == 0 else reversed(order):
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return times


def ratio(numerator: Sequence[float], denominator: Sequence[float]) -> dict[str, float]:
    """Round-by-round ratios of two interleaved timings: median, min and max."""
    ratios = [a / b for a, b in zip(numerator, denominator, strict=True)]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}


def ratio_text(r: dict[str, float]) -> str:
    return f"{r['median']:.3f} (min {r['min']:.3f}, max {r['max']:.3f})"


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table (readable in a terminal, pasted as is into RESULTS.md)."""
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def plain_fsdp(fmodel, optimizer, params, opt_state):
    """Plain `jax.jit` FSDP, the baseline meshscale's ``fsdp`` is measured against:
    ``(step, (params, opt_state) shardings, batch sharding)``. Every parameter and
    optimizer leaf is split over all devices on its largest divisible axis and GSPMD
    partitions the rest; the loss scans the layers, each rematerialised (as meshscale's
    default ``remat="layer"``); the step donates its state. `params` and `opt_state` may
    be abstract (`jax.ShapeDtypeStruct`) or arrays: only their shapes are read."""
    import jax
    import optax
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    from meshscale.model.contract import layer_inputs, mean_loss, run_layers

    n = jax.device_count()
    mesh = jax.make_mesh((n,), ("d",), axis_types=(AxisType.Auto,))  # Explicit refuses
    # the embedding's gather

    def split(x):
        dims = [i for i, size in enumerate(x.shape) if size % n == 0]
        spec = [None] * len(x.shape)
        if dims:
            spec[max(dims, key=lambda i: x.shape[i])] = "d"
        return NamedSharding(mesh, P(*spec))

    def loss(params, batch):
        model = fmodel.merge(params)
        h = run_layers(model.blocks, model.embed(batch), layer_inputs(model, batch), remat=True)
        return mean_loss(model.head_loss(h, batch))

    def step(params, opt_state, batch):
        value, grads = jax.value_and_grad(loss)(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    shardings = jax.tree.map(split, (params, opt_state))
    jitted = jax.jit(step, out_shardings=(*shardings, None), donate_argnums=(0, 1))
    return jitted, shardings, NamedSharding(mesh, P("d"))
