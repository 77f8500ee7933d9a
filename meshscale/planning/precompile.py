"""Background pre-compilation: the next meshes' executables, ready before they are needed.

In JAX every new mesh is a cold compile, and at real model sizes one compile takes
minutes, so a search over k candidates costs k compiles exactly when the job waits.
A `Precompiler` takes the compiler off that path: while training runs on the current
mesh, a background thread compiles the candidates of the device counts most likely next
(what the resource source announces, else one device fewer and one more), one at a time,
at the lowest CPU priority, up to a budget. Results land in the trainer's `CompileCache`
marked "background", so the search and the switch that follow find them there.

Never: fail training, or compete with steps that are being timed: while a search
try-runs candidates the precompiler is paused (`paused`), and `activity` lets the
trainer drop baseline windows during which it compiled, so try-runs and baseline are
both measured on quiet cores. A pre-compile that raises is recorded and skipped.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import os
import queue
import threading
import time
from collections.abc import Sequence

import jax

from meshscale.errors import InvalidArgument, MeshscaleError
from meshscale.layout.mesh import MeshShape
from meshscale.planning import rank
from meshscale.planning.cost import CostModel, Workload
from meshscale.planning.space import Candidate, SearchSpace
from meshscale.training.trainer import Trainer

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PrecompileRecord:
    num_devices: int
    shape: MeshShape
    status: str  # "compiled" | "cached" | "failed: ..."
    seconds: float


def likely_next_counts(current: int, *, p_min: int, max_devices: int,
                       announced: Sequence[int] = ()) -> list[int]:
    """Device counts to prepare for: the announced ones, else current - 1 and current + 1.

    Counts outside ``[p_min, max_devices]`` and the current count are dropped.
    """
    wanted = list(announced) if announced else [current - 1, current + 1]
    return [n for n in dict.fromkeys(wanted) if p_min <= n <= max_devices and n != current]


def devices_for(count: int, granted: Sequence[jax.Device],
                pool: Sequence[jax.Device] | None = None) -> list[jax.Device]:
    """The devices a count most likely means: a prefix of those granted now, or those
    plus the next ones of the pool (the order `resources` hands out counts)."""
    granted = list(granted)
    if count <= len(granted):
        return granted[:count]
    extra = [d for d in (jax.devices() if pool is None else pool) if d not in granted]
    return (granted + extra)[:count]


class Precompiler:
    """A background thread compiling candidate meshes into `trainer.cache`.

    Args:
      trainer: whose compile cache receives the executables.
      space: the same `SearchSpace` the real search will use (an int ``p_min``).
      budget: at most this many compiles per `plan` call.
      nice: CPU priority of the thread (Linux: per thread; 19 is the lowest).
      top_k: per device count, compile only the current mesh and the ``top_k +
        rank.EXTRA`` candidates the cost model ranks best (`meshscale.planning.rank`): the
        ones a pruned search will try-run. None: every candidate.
      cost_model: its calibration (share the search's); None: a fresh one.
    """

    def __init__(self, trainer: Trainer, *, space: SearchSpace, budget: int = 8,
                 nice: int = 19, top_k: int | None = rank.TOP_K,
                 cost_model: CostModel | None = None):
        if not isinstance(space.p_min, int):
            raise MeshscaleError(f"the precompiler needs an int p_min, got {space.p_min!r}")
        self.trainer, self.space, self.budget, self.nice = trainer, space, budget, nice
        self.top_k, self.cost_model = top_k, cost_model if cost_model is not None else CostModel()
        self.records: collections.deque[PrecompileRecord] = collections.deque(maxlen=1000)
        self._queue: queue.Queue = queue.Queue()
        self._idle = threading.Event()
        self._idle.set()
        self._gate = threading.Lock()  # held by each compile, and by `paused` throughout
        self._compiling = False
        self.activity = 0  # compiles started or finished so far (see `quiet_since`)
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="meshscale-precompile",
                                        daemon=True)
        self._thread.start()

    def plan(self, counts: Sequence[int], granted: Sequence[jax.Device], *,
             current: MeshShape | None, current_devices: Sequence[jax.Device] = ()) -> int:
        """Queue the likely candidates of each count in `counts` (the current mesh and the
        cost model's top k, or every one); returns how many were queued.

        The candidates are the ones the search will list for that count: relative to the
        current mesh while it survives on those devices, from scratch otherwise.
        """
        jobs = []
        kept = {int(d.id) for d in current_devices}
        for n in counts:
            devices = devices_for(n, granted)
            if len(devices) < n:
                continue
            survives = current is not None and kept <= {int(d.id) for d in devices}
            try:
                found = self.space.candidates(n, num_layers=self.trainer.num_layers,
                                              global_batch=self.trainer.global_batch,
                                              current=current if survives else None)
            except MeshscaleError as e:
                log.info("no pre-compile for %d devices: %s", n, e)
                continue
            jobs += [(n, c.shape, devices) for c in self._likely(found, current)
                     if self.trainer.step_key(c.shape, devices) not in self.trainer.cache]
        jobs = jobs[: self.budget]
        if jobs:
            self._idle.clear()
            for job in jobs:
                self._queue.put(job)
            self._queue.put(None)  # marks the end of this plan
        return len(jobs)

    def _likely(self, found: list[Candidate], current: MeshShape | None) -> list[Candidate]:
        """The candidates a pruned search tries (`rank.pruned_search`): all while it would
        try all, else the current mesh and the top k + `rank.EXTRA` (its likeliest extras)."""
        keep = None if self.top_k is None else self.top_k + rank.EXTRA
        if keep is None or len(found) <= keep + (current is not None):
            return found
        try:
            ranked = rank.rank(found, Workload.from_trainer(self.trainer),
                               self.cost_model.constants(), current=current)
        except Exception as e:  # no cost model for this model: every candidate
            log.info("pre-compiling every candidate (no cost model: %s)", e)
            return found
        top = [p.shape for p in ranked if p.rank and p.shape != current][:keep]
        return [c for c in found if c.shape in top or c.shape == current]

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every queued compile is done; False on timeout."""
        return self._idle.wait(timeout)

    def quiet_since(self, activity: int) -> bool:
        """Whether nothing was compiled since `activity` was read, and nothing is now."""
        return self.activity == activity and not self._compiling

    @contextlib.contextmanager
    def paused(self):
        """No compile runs inside the block (one already running finishes first)."""
        with self._gate:
            yield

    def close(self, timeout: float | None = 600.0) -> None:
        """Stop: drop the queued compiles and wait (up to `timeout` s) for the one running,
        so no compile outlives the trainer that asked for it."""
        self._stop = True
        self._queue.put(None)
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _run(self) -> None:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self.nice)
        except (AttributeError, OSError, PermissionError):  # not Linux, or not allowed
            pass
        while not self._stop:
            job = self._queue.get()
            if self._stop:
                break
            if job is None:
                if self._queue.empty():
                    self._idle.set()
                continue
            n, shape, devices = job
            with self._gate:
                self._compile(n, shape, devices)

    def _compile(self, n: int, shape: MeshShape, devices) -> None:
        start = time.perf_counter()
        key = self.trainer.step_key(shape, devices)
        if key in self.trainer.cache:
            status = "cached"
        else:
            self._compiling, self.activity = True, self.activity + 1
            try:
                self.trainer.compile_step(shape, devices, origin="background")
                status = "compiled"
            except Exception as e:  # a failed pre-compile never breaks training
                status = f"failed: {type(e).__name__}: {str(e)[:200]}"
                log.warning("pre-compile of %s on %d devices failed: %s", shape, n, e)
            finally:
                self._compiling, self.activity = False, self.activity + 1
        self.records.append(PrecompileRecord(n, shape, status, time.perf_counter() - start))


def resolve_mode(mode: str | Sequence[int]) -> str | list[int]:
    """"auto" -> on for GPU/TPU, off on CPU (where the compiler competes with the step for
    the same cores); "off"; or an explicit list of device counts."""
    if isinstance(mode, str):
        if mode not in ("auto", "off", "on"):
            raise InvalidArgument(f"precompile must be 'auto', 'on', 'off' or a list of device "
                                 f"counts, got {mode!r}")
        if mode == "auto":
            return "on" if jax.default_backend() in ("gpu", "tpu", "cuda", "rocm") else "off"
        return mode
    counts = [int(n) for n in mode]
    if any(n < 1 for n in counts):
        raise InvalidArgument(f"precompile counts must be positive, got {list(mode)}")
    return counts

