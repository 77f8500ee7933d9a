"""One try-run: compile a candidate mesh's real train step, check its memory, time it.

A try-run never changes the live state: it trains a *copy* placed on the candidate mesh
(the compiled step donates its input, so the copy is a fresh buffer even where placement
would alias), and the copy is dropped afterwards. A candidate that cannot run (invalid
shape, over the memory budget, an exception or out-of-memory while compiling or stepping)
comes back as a result with a ``"skipped: ..."`` or ``"failed: ..."`` status instead of
raising, so a search can go on to the next one.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import statistics
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from meshscale.errors import MeshscaleError
from meshscale.layout.mesh import MeshShape
from meshscale.layout.placement import move_tree
from meshscale.model.contract import Batch
from meshscale.planning.memory import bytes_per_device, fits, over_budget_reason
from meshscale.planning.space import Candidate
from meshscale.runtime import distributed
from meshscale.training.timing import Timing, time_steps
from meshscale.training.trainer import Trainer, TrainState

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TryRunResult:
    """What one try-run measured.

    Attributes:
      shape, kind: the candidate.
      status: ``"ok"``, ``"skipped: <why>"`` (not run: invalid, over budget) or
        ``"failed: <error>"`` (raised while compiling, placing or stepping).
      compile_seconds: time spent getting the executable (near 0 on a cache hit).
      compile_origin: ``"on-demand"`` (compiled by this try-run), ``"background"``
        (compiled ahead of it by someone else), ``"hit"`` (already compiled), ``""`` (none).
      step_seconds: median of the timed steps; step_spread: their max - min.
      samples_per_second: global batch / median step; per device: that / devices.
      tryrun_samples_per_second: samples used by the try-run (warm-up + timed) / its whole
        duration, compile and placement included: what the try-run cost in throughput.
      bytes_per_device: XLA's per-device memory for the compiled step (0 if not compiled).
      num_devices: pipe * data.
    """

    shape: MeshShape
    kind: str
    status: str
    compile_seconds: float = 0.0
    compile_origin: str = ""
    step_seconds: float = math.nan
    step_spread: float = math.nan
    samples_per_second: float = 0.0
    samples_per_second_per_device: float = 0.0
    tryrun_samples_per_second: float = 0.0
    bytes_per_device: int = 0
    num_devices: int = 0

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @classmethod
    def not_run(cls, candidate: Candidate, status: str, **measured) -> TryRunResult:
        return cls(candidate.shape, candidate.kind, status,
                   num_devices=candidate.shape.num_devices, **measured)


class LiveState:
    """The live train state as a try-run sees it: copied from, and released if need be.

    A try-run normally trains a copy beside the live state, so both must fit on the
    devices they share. When a candidate fits alone but not beside the live state, and the
    owner said how to get the state back (`restore`, e.g. from the checkpoint written
    before the search), the live state is released: its buffers are deleted and later
    try-runs time a fresh state of the same shapes. The owner then calls `restore` for
    the mesh it decides on. Without `restore` such a candidate is skipped.
    """

    def __init__(self, state: TrainState, *,
                 restore: Callable[[MeshShape, Sequence[jax.Device]], TrainState] | None = None):
        self.state: TrainState | None = state
        self.restore = restore

    @property
    def released(self) -> bool:
        return self.state is None

    def bytes_on(self, devices: Sequence[jax.Device]) -> int:
        """The most bytes the live state holds on any one of `devices` (0 once released)."""
        if self.state is None:
            return 0
        ids = {d.id for d in devices}
        per_device: dict[int, int] = {}
        for leaf in jax.tree.leaves(self.state):
            for shard in leaf.addressable_shards:
                if shard.device.id in ids:
                    per_device[shard.device.id] = per_device.get(shard.device.id, 0) + \
                        shard.data.nbytes
        return max(per_device.values(), default=0)

    def release(self) -> None:
        log.warning("releasing the live state to make room for a try-run; it is restored "
                    "after the decision")
        jax.tree.map(lambda x: x.delete(), self.state)
        self.state = None


def copy_state(trainer: Trainer, state: TrainState | None, shape: MeshShape,
               devices: Sequence[jax.Device]) -> TrainState:
    """A copy of `state` on `shape`'s mesh that shares no buffer with `state`.

    The compiled step donates its input, and placement alone (`meshscale.layout.placement.move`,
    as `jax.device_put`) keeps the source's buffers wherever a shard already sits on the
    right device: the very same array when the sharding matches, and shared per-device
    buffers across overlapping meshes (`device_put` too, even with ``may_alias=False``,
    checked on jax 0.10, CPU). Donating such a placement deletes the live state;
    `jnp.copy` (a computation, so new buffers) after placing makes the copy real. Leaf by
    leaf, so at most one leaf's placement exists beside the copy.

    With several processes the state is not moved in memory (`distributed.can_place`):
    the try-run trains a fresh state of the same shapes and shardings
    (`Trainer.init_state`); a step's time does not depend on the values it computes with.
    So does a released live state (`LiveState`).
    """
    if state is None or not distributed.can_place():
        return trainer.init_state(shape, devices)
    targets = trainer.targets(shape, devices)
    # `placement.move` (per-device copies), not `jax.device_put`: between meshes of other
    # device orders device_put reshards with collectives, and several of those in flight
    # at once deadlocked XLA's CPU rendezvous (seen under load: all-to-all on 2 devices).
    return move_tree(state, targets, trainer.num_layers, then=jnp.copy)


def failure_status(error: BaseException) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    if "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower():
        return f"failed: out of memory ({text[:200]})"
    return f"failed: {type(error).__name__}: {text[:200]}"


def _compile(trainer: Trainer, shape: MeshShape, devices) -> tuple[jax.stages.Compiled, str]:
    key = trainer.step_key(shape, devices)
    seen = trainer.cache.recorded
    compiled = trainer.compile_step(shape, devices)
    # A background compile that finished while we waited is recorded with its own origin.
    if any(e.key == key and e.outcome == "miss" and e.origin == "on-demand"
           for e in trainer.cache.events_since(seen)):
        return compiled, "on-demand"
    return compiled, "background" if trainer.cache.origin(key) == "background" else "hit"


def try_run(trainer: Trainer, state: TrainState | LiveState, batches: Sequence[Batch],
            candidate: Candidate, devices: Sequence[jax.Device], *,
            timing: Timing | None = None, memory_budget: int | None = None) -> TryRunResult:
    """Compile, memory-check and time `candidate` on a copy of the live `state`.

    Args:
      trainer: the `Trainer` (its compile cache is shared, so a repeated try-run of the
        same shape on the same devices does not compile again).
      state: the live train state, on any mesh; never modified or donated. A `LiveState`
        may be released to make room (see there).
      batches: host (or device) global batches, used cyclically; each timed step puts its
        batch on the mesh, as a training step does, so try-runs compare with a baseline
        measured from ordinary steps.
      candidate: the shape to try.
      devices: the devices available; the mesh uses the first ``pipe * data``.
      timing: `Timing.warmup` untimed steps after compiling (first-run allocation,
        autotuning), then `Timing.steps` timed ones (each waited for, `time_steps`);
        their median is the step time.
      memory_budget: bytes per device; a candidate needing more, counting the live
        state on the same devices, is skipped unrun (or the live state released).
    """
    live = state if isinstance(state, LiveState) else LiveState(state)
    shape = candidate.shape
    timing = timing or Timing()
    warmup, steps = timing.warmup, timing.steps
    if not batches:
        raise ValueError("try_run needs at least one batch")
    try:
        trainer.check(shape, devices)
    except MeshscaleError as e:
        return TryRunResult.not_run(candidate, f"skipped: {e}")
    idle = distributed.idle_processes(devices[: shape.num_devices])
    if idle:
        return TryRunResult.not_run(candidate, f"skipped: mesh {shape} leaves process(es) "
                                               f"{idle} without devices")
    start = time.perf_counter()
    compiled, measured, failure = _compile_measured(trainer, shape, devices)
    if failure := distributed.failed_anywhere(failure):  # never step while a peer does not
        return TryRunResult.not_run(candidate, failure, **measured)
    refused = _memory_check(live, measured["bytes_per_device"], shape, devices, memory_budget)
    if refused:
        return TryRunResult.not_run(candidate, refused, **measured)
    times = []
    try:
        # Ready before the first step: on CPU a step's collectives in flight beside the
        # copy's resharding collectives can deadlock XLA's rendezvous (seen under load).
        run_state = jax.block_until_ready(copy_state(trainer, live.state, shape, devices))
        batch_sh = trainer.batch_sharding(shape, devices)  # kept, as ElasticTrainer.step does
    except Exception as e:
        failure = failure_status(e)
    if failure := distributed.failed_anywhere(failure):  # placed everywhere, or nowhere
        return TryRunResult.not_run(candidate, failure, **measured)

    def one_step(i: int):  # a step as training runs it: feed the batch, step
        nonlocal run_state
        batch = trainer.put_batch(batches[i % len(batches)], shape, devices, shardings=batch_sh)
        run_state, metrics = compiled(run_state, batch)
        return run_state, metrics

    try:
        times = time_steps(one_step, warmup=warmup, steps=steps)
        jax.tree.map(lambda x: x.delete(), run_state)  # free the copy now, not at next GC
    except Exception as e:
        log.warning("try-run %s failed: %s", shape, e)
        failure = failure_status(e)
    elapsed = time.perf_counter() - start
    # Across processes the slowest counts, step by step (NaN where one failed).
    local = [measured["compile_seconds"], elapsed, *(times if not failure else [math.nan] * steps)]
    compile_seconds, elapsed, *times = distributed.slowest(local).tolist()
    failure = failure or ("failed: on another process" if math.isnan(elapsed + sum(times))
                          else None)
    if failure:
        return TryRunResult.not_run(candidate, failure, **measured)
    measured["compile_seconds"] = compile_seconds
    return _result(trainer, candidate, times, elapsed, warmup + steps, measured)


def _compile_measured(trainer: Trainer, shape: MeshShape, devices):
    """(compiled step, its compile time, origin and bytes per device, failure or None)."""
    start, measured = time.perf_counter(), {}
    try:
        compiled, origin = _compile(trainer, shape, devices)
        measured.update(compile_seconds=time.perf_counter() - start, compile_origin=origin,
                        bytes_per_device=bytes_per_device(compiled))
        return compiled, measured, None
    except Exception as e:  # any failure is a result: the search goes on
        log.warning("try-run %s failed: %s", shape, e)
        return None, measured, failure_status(e)


def _memory_check(live: LiveState, need: int, shape: MeshShape, devices,
                  budget: int | None) -> str | None:
    """Why the candidate cannot run within `budget` (agreed across processes), or None;
    releases the live state when the candidate fits only without it and it may be."""
    over = None if fits(need, budget) else over_budget_reason(need, budget)
    if over := distributed.failed_anywhere(over):  # over on any process: skipped on all
        return over
    beside = live.bytes_on(devices[: shape.num_devices])
    crowded = None if fits(need + beside, budget) else \
        over_budget_reason(need + beside, budget) + " with the live state beside it"
    if crowded := distributed.failed_anywhere(crowded):  # released everywhere, or nowhere
        if live.restore is None:
            return crowded
        live.release()
    return None


def _result(trainer: Trainer, candidate: Candidate, times: list[float], elapsed: float,
            total: int, measured: dict) -> TryRunResult:
    shape = candidate.shape
    median = statistics.median(times)
    sps = trainer.global_batch / median
    result = TryRunResult(
        shape, candidate.kind, "ok", step_seconds=median, step_spread=max(times) - min(times),
        samples_per_second=sps, samples_per_second_per_device=sps / shape.num_devices,
        tryrun_samples_per_second=trainer.global_batch * total / elapsed,
        num_devices=shape.num_devices, **measured)
    log.info("try-run %s (%s): %.1f samples/s, step %.4fs, compile %.2fs (%s)", shape,
             candidate.kind, sps, median, result.compile_seconds, result.compile_origin)
    return result
