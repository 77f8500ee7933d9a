"""The record of training steps: timing windows, step records and whole-run totals.

The loop never waits on the device per step. Steps are collected in a timing window with
their device losses; closing the window blocks once (on its losses, which drains the
queue), so its wall time / steps is an honest step time, and records every step with
its fetched loss. Windows the owner marks clean (past warm-up, nothing else running
beside them) feed the baseline. Records are bounded; `Totals` counts the whole run.

The same block finds non-finite steps: `end` returns the steps of the window whose loss
or gradient norm is nan or inf, so the owner checks every step for free.

Never: block on the device except when a window closes.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import time
from collections.abc import Callable

import jax


@dataclasses.dataclass(frozen=True)
class StepRecord:
    """One training step. `seconds` is its timing window's wall time / steps; `loss` is
    fetched from the device with its window."""

    step: int
    loss: float
    seconds: float
    samples_per_second: float
    mesh: str
    num_devices: int


@dataclasses.dataclass(frozen=True)
class Window:
    """A closed timing window: its steps, their fetched losses, the window's wall time
    per step and samples/s, on which mesh."""

    steps: list[int]
    losses: list[float]
    seconds: float
    samples_per_second: float
    mesh: str
    num_devices: int


@dataclasses.dataclass
class Totals:
    """Whole-run counters, kept however short the bounded history is. `goodput` is the
    run's `meshscale.observe.goodput` summary (wall seconds, goodput, seconds per cause)."""

    steps: int = 0
    switches: int = 0
    searches: int = 0
    checkpoints: int = 0
    seconds_per_mesh: dict[str, float] = dataclasses.field(default_factory=dict)
    steps_per_mesh: dict[str, int] = dataclasses.field(default_factory=dict)
    goodput: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class _Window:
    """The steps dispatched since the last block: (step, device loss) and when it began."""

    start: float
    mesh: str
    num_devices: int
    clean: bool  # counts for the baseline: past warm-up, no save, no background compile
    activity: int  # the owner's background-activity counter at the start
    losses: list = dataclasses.field(default_factory=list)  # (step, loss, grad norm)
    checked: int = 0  # the first `checked` steps were already checked for finiteness


class StepLog:
    """Timing windows of `timing_window` steps, the newest `history_limit` step records,
    the step times of the newest `baseline_window` clean windows, and run totals."""

    def __init__(self, *, global_batch: int, timing_window: int, history_limit: int,
                 baseline_window: int, on_window: Callable[[Window], None] | None = None):
        self.global_batch = global_batch
        self.on_window = on_window  # told of every closed window (metrics)
        self.timing_window = timing_window
        self.records: collections.deque[StepRecord] = collections.deque(maxlen=history_limit)
        self.recent: collections.deque[float] = collections.deque(maxlen=baseline_window)
        self.totals = Totals()
        self.last_samples_per_second = math.nan  # of the last closed window
        self._window: _Window | None = None

    @property
    def open(self) -> bool:
        return self._window is not None

    def begin(self, mesh: str, num_devices: int, *, clean: bool, activity: int = 0) -> None:
        """Start timing the next steps (`clean`: may count for the baseline)."""
        self._window = _Window(time.perf_counter(), mesh, num_devices, clean, activity)

    def add(self, step: int, loss: jax.Array, grad_norm: jax.Array | None = None) -> bool:
        """Record a dispatched step; True when the window is full (then `end` it)."""
        self._window.losses.append((step, loss, grad_norm))
        return len(self._window.losses) >= self.timing_window

    def spoil(self) -> None:
        """The open window no longer counts for the baseline (something ran beside it)."""
        if self._window is not None:
            self._window.clean = False

    def nonfinite(self) -> list[int]:
        """The open window's steps not yet checked whose loss or gradient norm is not
        finite (fetching them: waits for the newest step; `end` does not fetch them
        again, a fetched jax.Array keeps its host copy)."""
        if self._window is None:
            return []
        new = self._window.losses[self._window.checked:]
        self._window.checked = len(self._window.losses)
        return _nonfinite(new)

    def end(self, quiet: Callable[[int], bool] = lambda activity: True) -> list[int]:
        """Block on the window's last step, time it, record its steps with their losses.
        A clean, full window whose `quiet(activity)` holds adds its step time to `recent`.
        Returns the window's steps whose loss or gradient norm is not finite."""
        window, self._window = self._window, None
        if window is None or not window.losses:
            return []
        losses = jax.device_get([loss for _, loss, _ in window.losses])  # waits: last step
        seconds = (time.perf_counter() - window.start) / len(losses)
        if window.clean and len(losses) >= self.timing_window and quiet(window.activity):
            self.recent.append(seconds)
        sps = self.global_batch / seconds if seconds > 0 else math.inf
        self.last_samples_per_second = sps
        for (step, _, _), loss in zip(window.losses, losses, strict=True):
            self.records.append(StepRecord(step, float(loss), seconds, sps, window.mesh,
                                           window.num_devices))
        t = self.totals
        t.steps += len(losses)
        t.seconds_per_mesh[window.mesh] = t.seconds_per_mesh.get(window.mesh, 0.0) \
            + seconds * len(losses)
        t.steps_per_mesh[window.mesh] = t.steps_per_mesh.get(window.mesh, 0) + len(losses)
        if self.on_window is not None:
            self.on_window(Window([step for step, _, _ in window.losses],
                                  [float(x) for x in losses], seconds, sps, window.mesh,
                                  window.num_devices))
        return _nonfinite(window.losses[window.checked:])

    def interrupt(self, quiet: Callable[[int], bool] = lambda activity: True) -> list[int]:
        """End the open window early (a save, search or switch interrupts it): its steps
        are recorded, its time does not count for the baseline. Returns `end`'s."""
        self.spoil()
        return self.end(quiet)


def _nonfinite(losses: list) -> list[int]:
    """The steps of (step, loss, grad norm) whose loss or gradient norm is not finite."""
    fetched = jax.device_get([(loss, norm) for _, loss, norm in losses])
    return [step for (step, _, _), (loss, norm) in zip(losses, fetched, strict=True)
            if not math.isfinite(float(loss)) or (norm is not None
                                                   and not math.isfinite(float(norm)))]
