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


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table (readable in a terminal, pasted as is into RESULTS.md)."""
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
