"""Goodput: where every second of a run went.

An elastic job's headline number is the share of its wall time that trained the model.
`Ledger` charges every second since the process started to exactly one cause: one clock,
a stack of causes, the innermost charged (a checkpoint written during a switch is
checkpoint time, not switch time), so the causes add up to the wall time by
construction and nothing is counted twice. Causes:

- ``productive``: training steps (the loop between its steps included: the step is
  dispatched asynchronously, so the device works while the host prepares the next batch);
- ``retrained``: steps trained again after a restart (their step number was reached
  before, by an attempt that died before saving it);
- ``startup``: process start, imports, JAX initialisation, building the model and the
  first state (read from the OS: the time before `Ledger` existed counts);
- ``restore``: reading a checkpoint back (on resume and after a non-finite step);
- ``checkpoint``: the blocking part of saves and waits for writes;
- ``search_compile`` / ``search_tryrun``: compiling and timing candidate meshes;
- ``switch``: moving the state onto a new mesh and compiling its step;
- ``idle``: the loop waiting for devices or for the user's schedule
  (``with ledger.spend("idle"):``); user code may name its own causes the same way.

Every second is also charged to the mesh the loop is on (`label`; a switch's cost to the
mesh it moves to), so goodput reads per mesh as well as for the run.

`combine` sums the ledgers of the attempts of one run (a Ray restart or a resumed job is a
new process with its own ledger): the time between one attempt's last record and the
next attempt's process start is ``between_attempts``.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterable, Iterator, Mapping

PRODUCTIVE = "productive"
CAUSES = (PRODUCTIVE, "retrained", "startup", "restore", "checkpoint", "search_compile",
          "search_tryrun", "switch", "idle")
BETWEEN_ATTEMPTS = "between_attempts"
NO_MESH = "-"  # time before the first mesh (start-up), and between attempts


_ACCOUNTED = {"until": None}  # monotonic time up to which this process's ledgers charged


def process_age() -> float | None:
    """Seconds since this process started (Linux: /proc), or None where unknown."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


def begin_attempt() -> None:
    """This process's next `Ledger` charges from now on, not from the process start: for
    a pooled worker (a Ray actor) whose process idled before the attempt was handed to
    it. The time before is the run's ``between_attempts``, not this attempt's start-up."""
    _ACCOUNTED["until"] = time.monotonic()


class Ledger:
    """Charges the time since `started` to one cause at a time.

    Args:
      base: the cause charged when no `spend` is open (``startup`` until the loop trains).
      age: seconds the process ran before this ledger (charged to ``startup``); default:
        read from the OS, or, when an earlier ledger of this process already charged
        them, the time since that ledger's last charge (a second run in one process).
      clock: a monotonic clock (tests inject one).
    """

    def __init__(self, base: str = "startup", *, age: float | None = None,
                 clock=time.monotonic):
        self._clock = clock
        self._mark = clock()
        self._tracked = age is None and clock is time.monotonic  # the process's own time
        if self._tracked:
            age = process_age()
            if _ACCOUNTED["until"] is not None:
                since = self._mark - _ACCOUNTED["until"]
                age = since if age is None else min(age, since)
        self.started = self._mark - (age or 0.0)  # on `clock`
        self.started_at = time.time() - (age or 0.0)  # wall clock: for combining attempts
        self.label = NO_MESH  # the mesh charged along with the cause
        self._seconds: dict[tuple[str, str], float] = {(NO_MESH, "startup"): age or 0.0}
        self._stack = [base]

    def _settle(self) -> None:
        now = self._clock()
        key = (self.label, self._stack[-1])
        self._seconds[key] = self._seconds.get(key, 0.0) + now - self._mark
        self._mark = now
        if self._tracked:
            _ACCOUNTED["until"] = max(now, _ACCOUNTED["until"] or now)

    def relabel(self, label: str) -> None:
        """From now on charge time to mesh `label` too."""
        self._settle()
        self.label = label

    @contextlib.contextmanager
    def spend(self, cause: str) -> Iterator[None]:
        """Charge the time inside the block to `cause` (nested: the innermost)."""
        self._settle()
        self._stack.append(cause)
        try:
            yield
        finally:
            self._settle()
            self._stack.pop()

    def set_base(self, cause: str) -> None:
        """From now on charge time outside any `spend` to `cause`."""
        self._settle()
        self._stack[0] = cause

    def move(self, seconds: float, source: str, target: str) -> None:
        """Re-charge up to `seconds` already charged to `source` to `target` (a search's
        compile share, a window's retrained steps)."""
        self._settle()
        source_key, target_key = (self.label, source), (self.label, target)
        moved = max(0.0, min(seconds, self._seconds.get(source_key, 0.0)))
        self._seconds[source_key] = self._seconds.get(source_key, 0.0) - moved
        self._seconds[target_key] = self._seconds.get(target_key, 0.0) + moved

    @property
    def seconds(self) -> dict[str, float]:
        """Seconds per cause so far (the open cause charged up to now)."""
        return _by_cause(self.per_mesh())

    def per_mesh(self) -> dict[str, dict[str, float]]:
        """Seconds per cause on each mesh (``-``: before the first mesh)."""
        self._settle()
        out: dict[str, dict[str, float]] = {}
        for (label, cause), s in self._seconds.items():
            if s > 0 or cause == PRODUCTIVE:
                out.setdefault(label, {})[cause] = s
        return out

    def snapshot(self) -> dict:
        """The JSON form: wall seconds, goodput, seconds per cause, and per mesh."""
        per_mesh = self.per_mesh()
        return {**summary(_by_cause(per_mesh)),
                "per_mesh": {label: summary(c) for label, c in per_mesh.items()}}


def _by_cause(per_mesh: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    total: dict[str, float] = {}
    for causes in per_mesh.values():
        for cause, s in causes.items():
            total[cause] = total.get(cause, 0.0) + s
    return total


def summary(seconds: Mapping[str, float]) -> dict:
    """wall = the sum of the causes; goodput = productive / wall; badput by cause."""
    wall = sum(seconds.values())
    good = seconds.get(PRODUCTIVE, 0.0)
    return {"wall_seconds": wall, "goodput": good / wall if wall > 0 else 0.0,
            "seconds": dict(sorted(seconds.items(), key=lambda kv: -kv[1]))}


def combine(attempts: Iterable[Mapping]) -> dict:
    """One run's goodput from its attempts' last snapshots, in time order; each a mapping
    with ``started_at`` (wall clock of the process start), ``time`` (when the snapshot
    was taken) and ``goodput`` (a `snapshot`). The gap between an attempt's last snapshot
    and the next one's process start (a crash, a restart, waiting for capacity) is
    charged to ``between_attempts``."""
    per_mesh: dict[str, dict[str, float]] = {}
    attempts = sorted(attempts, key=lambda a: a["started_at"])
    for i, attempt in enumerate(attempts):
        meshes = attempt["goodput"].get("per_mesh") or {NO_MESH: attempt["goodput"]}
        for label, part in meshes.items():
            mine = per_mesh.setdefault(label, {})
            for cause, s in part["seconds"].items():
                mine[cause] = mine.get(cause, 0.0) + s
        if i + 1 < len(attempts):
            gap = max(0.0, attempts[i + 1]["started_at"] - attempt["time"])
            mine = per_mesh.setdefault(NO_MESH, {})
            mine[BETWEEN_ATTEMPTS] = mine.get(BETWEEN_ATTEMPTS, 0.0) + gap
    return {**summary(_by_cause(per_mesh)), "attempts": len(attempts),
            "per_mesh": {label: summary(c) for label, c in per_mesh.items()}}


def of_run(records: Iterable[Mapping]) -> dict:
    """One run's goodput from its ``metrics.jsonl`` records: every attempt's last snapshot
    (an attempt: one process, named by its pid and start time), `combine` d."""
    last: dict[tuple, Mapping] = {}
    for record in records:
        if "goodput" in record and "started_at" in record:
            last[(record.get("attempt"), record["started_at"])] = record
    return combine(last.values())
