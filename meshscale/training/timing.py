"""How steps are timed: one warm-up rule and one timer for try-runs, the loop and the CLI.

The first steps on a new mesh pay for first-run allocation (and, on GPU, autotuning), so
they say nothing about steady-state speed: `WARMUP_STEPS` of them are never timed,
wherever a step time is measured. A timed step is what training runs: put the batch,
step, wait for the result.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax

from meshscale.errors import InvalidArgument

WARMUP_STEPS = 2


@dataclasses.dataclass(frozen=True)
class Timing:
    """How step times are measured and how much of them is kept.

    Attributes:
      warmup: untimed steps on a new mesh (try-runs, the loop's first windows, the CLI's
        baseline).
      steps: timed steps per try-run.
      window: the elastic loop blocks on the device once every this many steps, fetching
        the window's losses and timing it (wall time / steps).
      baseline_steps: the loop's baseline is the median of the clean windows among the
        last this many steps.
      history_limit: the loop keeps the newest this many events and step records
        (`ElasticTrainer.totals` counts everything).
    """

    warmup: int = WARMUP_STEPS
    steps: int = 5
    window: int = 10
    baseline_steps: int = 20
    history_limit: int = 10_000

    def __post_init__(self):
        if not isinstance(self.warmup, int) or self.warmup < 0:
            raise InvalidArgument(f"Timing.warmup must be an int >= 0, got {self.warmup!r}")
        for name in ("steps", "window", "baseline_steps", "history_limit"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise InvalidArgument(f"Timing.{name} must be a positive int, got {value!r}")


def time_steps(run_one: Callable[[int], Any], *, warmup: int = WARMUP_STEPS,
               steps: int) -> list[float]:
    """Run ``run_one(i)`` for ``i < warmup + steps``, waiting for each result; the seconds
    of the last `steps` calls (the warm-up ones are run, never timed)."""
    times = []
    for i in range(warmup + steps):
        tick = time.perf_counter()
        jax.block_until_ready(run_one(i))
        if i >= warmup:
            times.append(time.perf_counter() - tick)
    return times
