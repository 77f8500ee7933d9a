"""The search: try-run every candidate mesh, then decide whether switching is worth it.

`search` measures (candidates from `meshscale.planning.space`, one `try_run` each); `decide` is the
pure rule over the measurements, so it can be checked without compiling anything:

- best: the highest samples/s among the try-runs that ran (ties: fewer devices, then the
  current mesh, then candidate order);
- improvement: ``best / baseline - 1`` (samples/s);
- switch: only when improvement > threshold, and, given the remaining steps and the
  measured cost of a switch, only when the time it saves pays that cost back;
- maximum useful devices: the fewest devices within `eps` of the best throughput.

A search never changes the live state (each try-run trains a copy) and never raises for a
candidate that fails: it is recorded and the search goes on. When the mesh spans several
processes, every process runs the same candidates in the same order, each try-run's step
times are the slowest process's, and process 0's decision is broadcast to all, so no two
processes can pick different meshes.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import statistics
import warnings
from collections.abc import Callable, Sequence

import jax

from meshscale.errors import (
    InsufficientDevices,
    InvalidArgument,
    InvalidMeshShape,
)
from meshscale.layout.mesh import MeshShape
from meshscale.model.contract import Batch
from meshscale.planning import memory, rank
from meshscale.planning.cost import CostModel, Workload
from meshscale.planning.space import Candidate, RuledOut, SearchSpace
from meshscale.planning.tryrun import LiveState, TryRunResult, failure_status, try_run
from meshscale.runtime import distributed
from meshscale.training.compile_cache import enable_persistent_cache
from meshscale.training.timing import WARMUP_STEPS, Timing
from meshscale.training.trainer import Trainer, TrainState

log = logging.getLogger(__name__)

Measure = Callable[[Candidate], TryRunResult]


@dataclasses.dataclass(frozen=True)
class TryRunProgress:
    """Where a search stands, for a progress display (`search`'s ``progress``): try-run
    `index` (from 0) of `total`, of `candidate`; `result` is None as it starts, its
    result once it ended."""

    index: int
    total: int
    candidate: Candidate
    result: TryRunResult | None = None


Progress = Callable[[TryRunProgress], None]
_ROUNDING = 1e-9  # 105 vs 100 samples/s is "at" a 5% threshold, whatever floats say


@dataclasses.dataclass(frozen=True)
class Baseline:
    """Steady-state throughput of the mesh running now.

    `source` says how it was measured: ``"try-run"`` (the current mesh's own try-run in
    the same search: the same procedure, at the same moment, as the candidates it is
    compared with) or ``"steps"`` (timing windows of ordinary training steps).
    """

    samples_per_second: float
    num_devices: int
    shape: MeshShape | None = None
    source: str = "steps"

    @classmethod
    def from_step_times(cls, times: Sequence[float], global_batch: int, shape: MeshShape, *,
                        skip: int = WARMUP_STEPS) -> Baseline:
        """Global batch / median step time, after dropping the first `skip` steps.

        The first steps on a mesh include compiling and first-run allocation, which say
        nothing about steady-state speed; the median ignores stragglers among the rest.
        """
        steady = list(times)[skip:]
        if not steady:
            raise ValueError(f"no step times left after skipping {skip} of {len(times)}: "
                             "time more steps")
        return cls(global_batch / statistics.median(steady), shape.num_devices, shape)

    @classmethod
    def from_try_run(cls, result: TryRunResult) -> Baseline:
        return cls(result.samples_per_second, result.num_devices, result.shape,
                   source="try-run")


def like_with_like(baseline: Baseline | None, results: Sequence[TryRunResult],
                   current: MeshShape | None) -> Baseline | None:
    """The baseline to compare the try-runs with: the current mesh's own try-run when it
    ran (measured as the candidates were, at the same moment: no drift of load, no
    difference of procedure can make a mesh look faster than itself), else `baseline`
    (ordinary steps), else None (the start-up rule)."""
    own = next((r for r in results if r.ok and current is not None and r.shape == current),
               None)
    return Baseline.from_try_run(own) if own is not None else baseline


@dataclasses.dataclass(frozen=True)
class Decision:
    """What a search found and whether to switch.

    Attributes:
      baseline: the current mesh's throughput, or None at start-up.
      results: every try-run, in candidate order.
      best: the fastest try-run that ran, or None when none did.
      improvement: best / baseline samples/s - 1; nan without a baseline, inf when the
        baseline throughput is 0.
      switch: whether to move to ``best.shape``. At start-up (no baseline) it is True
        whenever a best exists: there is no running mesh to stay on.
      max_useful_devices: fewest devices within `eps` of the best samples/s (None if none
        ran): devices beyond it can be given back at a cost of at most `eps`.
      reason: the decision in words.
      threshold: the improvement a switch had to beat.
      p_min: the pipe width floor used (resolved when it was ``"auto"``).
      ruled_out: the meshes the search space left out on these devices and why, one
        `RuledOut` each (p_min, layers, max_pipe, the global batch, the vertical-only
        rule); memory shows in `results` (a ``"skipped: ..."`` status).
      predictions: every candidate's predicted and measured throughput and memory, and why
        it was or was not try-run (`rank.Prediction`); empty without the cost model.
    """

    baseline: Baseline | None
    results: tuple[TryRunResult, ...]
    best: TryRunResult | None
    improvement: float
    switch: bool
    max_useful_devices: int | None
    reason: str
    threshold: float
    p_min: int | None = None
    ruled_out: tuple[RuledOut, ...] = ()
    predictions: tuple[rank.Prediction, ...] = ()

    @property
    def target(self) -> MeshShape | None:
        """The shape to run next: the best when switching, else the current one."""
        if self.switch and self.best is not None:
            return self.best.shape
        return self.baseline.shape if self.baseline is not None else None


def _best(results: Sequence[TryRunResult]) -> TryRunResult | None:
    ranked = [(-r.samples_per_second, r.num_devices, r.kind != "current", i)
              for i, r in enumerate(results) if r.ok]
    return results[min(ranked)[-1]] if ranked else None


def max_useful_devices(results: Sequence[TryRunResult], *, eps: float = 0.05) -> int | None:
    """The fewest devices whose measured samples/s is within `eps` of the best measured."""
    best = _best(results)
    if best is None:
        return None
    floor = (1.0 - eps) * best.samples_per_second
    return min(r.num_devices for r in results if r.ok and r.samples_per_second >= floor)


def payback_seconds(baseline_sps: float, best_sps: float, global_batch: int,
                    remaining_steps: int) -> float:
    """Seconds saved over `remaining_steps` by running at `best_sps` instead of the baseline.

    ``(1 / baseline - 1 / best) * global_batch * remaining_steps``: the payback test of
    Pollux (Qiao et al., OSDI 2021), which re-allocates only when the goodput gained over
    the remaining work outweighs the re-allocation's cost.
    """
    return (1.0 / baseline_sps - 1.0 / best_sps) * global_batch * remaining_steps


def decide(baseline: Baseline | None, results: Sequence[TryRunResult], *,
           threshold: float = 0.05, remaining_steps: int | None = None,
           switch_cost: float | None = None, eps: float = 0.05,
           global_batch: int | None = None, available_devices: int | None = None,
           p_min: int | None = None) -> Decision:
    """The decision over measured try-runs (pure: no JAX, no timing).

    Args:
      baseline: throughput of the mesh running now; None at start-up.
      results: the try-runs.
      threshold: switch only when improvement is strictly above it (by more than float
        rounding: 105 vs 100 samples/s does not beat 0.05).
      remaining_steps, switch_cost: with both, also require `payback_seconds` >
        `switch_cost` (seconds to checkpoint, re-place and recompile); with either
        missing the payback test is not applied.
      eps: tolerance of `max_useful_devices`.
      global_batch: examples per step; defaults to what the best result implies
        (samples/s x median step seconds).
      available_devices: devices present now; when the baseline mesh needs more, it can
        no longer run, and the best mesh is taken whatever its improvement.
      p_min: recorded in the decision.
    """
    results = tuple(results)
    best = _best(results)
    useful = max_useful_devices(results, eps=eps)
    make = lambda improvement, switch, reason: Decision(
        baseline, results, best, improvement, switch, useful, reason, threshold, p_min)
    if best is None:
        failures = "; ".join(f"{r.shape}: {r.status}" for r in results[:3])
        return make(math.nan, False, f"no candidate ran ({len(results)} tried): {failures}")
    if baseline is None:
        return make(math.nan, True, f"start-up (no baseline): run the fastest measured, "
                                    f"{best.shape} at {best.samples_per_second:.1f} samples/s")
    improvement = (best.samples_per_second / baseline.samples_per_second - 1.0
                   if baseline.samples_per_second > 0 else math.inf)
    gain = f"{best.shape} is {improvement:+.1%} against the baseline"
    if available_devices is not None and baseline.num_devices > available_devices:
        return make(improvement, True,
                    f"the current mesh needs {baseline.num_devices} devices, only "
                    f"{available_devices} available: switch to {best.shape} ({gain})")
    if baseline.shape is not None and best.shape == baseline.shape:
        return make(improvement, False, f"the current mesh {best.shape} is the fastest measured")
    if not improvement > threshold + _ROUNDING:
        return make(improvement, False, f"stay: {gain}, not above the threshold {threshold:.1%}")
    if remaining_steps is not None and switch_cost is not None and math.isfinite(improvement):
        batch = global_batch or best.samples_per_second * best.step_seconds
        if not math.isfinite(batch):
            raise ValueError("decide needs global_batch= when results carry no step time")
        saved = payback_seconds(baseline.samples_per_second, best.samples_per_second, batch,
                                remaining_steps)
        if not saved > switch_cost:
            return make(improvement, False,
                        f"stay: {gain}, but it saves {saved:.1f}s over {remaining_steps} "
                        f"remaining steps, not more than the switch cost {switch_cost:.1f}s")
        return make(improvement, True, f"switch: {gain} (threshold {threshold:.1%}); it "
                                       f"saves {saved:.1f}s > switch cost {switch_cost:.1f}s")
    return make(improvement, True, f"switch: {gain} (threshold {threshold:.1%})")


def search(trainer: Trainer, state: TrainState | LiveState, batches: Sequence[Batch],
           devices: Sequence[jax.Device], *, space: SearchSpace | None = None,
           timing: Timing | None = None, baseline: Baseline | None = None,
           threshold: float = 0.05, current: MeshShape | None = None,
           remaining_steps: int | None = None, switch_cost: float | None = None,
           eps: float = 0.05, measure: Measure | None = None,
           compile_cache_dir: str | os.PathLike | None = None,
           progress: Progress | None = None, top_k: int | None | str = "auto",
           cost_model: CostModel | None = None, **legacy) -> Decision:
    """Try-run every candidate mesh on `devices` and decide whether to switch.

    Args:
      trainer: the model, optimizer and global batch (and the shared compile cache: a
        repeated search over the same devices compiles nothing).
      state: the live train state; never modified (each try-run trains a copy). Pass a
        `LiveState` with a ``restore`` to let a candidate that fits only without the
        live state release it (the caller restores it after the decision).
      batches: host batches for the try-runs, used cyclically.
      devices: the devices available now.
      space: the meshes to consider (`SearchSpace`: p_min, which may be ``"auto"``,
        max_pipe, microbatches, repeats, memory_budget); the same object the
        precompiler reads.
      timing: warm-up and timed steps per try-run (`Timing`).
      baseline: the running mesh's throughput from ordinary steps (None at start-up or
        when too few were timed); replaced by the current mesh's own try-run whenever
        that ran (`like_with_like`).
      current: the running shape (defaults to ``baseline.shape``).
      remaining_steps, switch_cost, threshold, eps: see `decide`.
      measure: replaces `try_run` (``Candidate -> TryRunResult``), e.g. in tests.
      compile_cache_dir: turn on JAX's persistent compilation cache there (put it under
        the run directory, so a restarted job loads instead of compiling).
      progress: called as each try-run starts and ends (`TryRunProgress`), e.g. to draw
        a progress bar; the search knows nothing of how it is shown.
      top_k: beyond ``top_k + rank.EXTRA`` candidates (+ the current mesh) only the current
        mesh, the top k predicted and uncertain ones are try-run (`rank.pruned_search`);
        None: all; ``"auto"``: `rank.TOP_K`, or all when `measure` is injected (free).
      cost_model: the calibration (`CostModel`, kept across searches and with the run);
        given, every candidate gets a prediction even when all are run.
      legacy: the keywords of the old form (p_min, max_pipe, microbatches, repeats,
        memory_budget, warmup, steps), deprecated: pass `space` and `timing`.

    Raises:
      InsufficientDevices: fewer devices than `p_min`.
      InvalidMeshShape: no valid shape at all on these devices.
    """
    space, timing = options_from_legacy(space, timing, legacy, "search")
    p_min = space.p_min
    devices = list(devices)
    if compile_cache_dir is not None:
        enable_persistent_cache(compile_cache_dir)
    budget = distributed.broadcast(memory.memory_budget(devices, space.memory_budget))
    if p_min == "auto":
        p_min = _agreed_p_min(trainer, devices, budget)
    current = baseline.shape if current is None and baseline is not None else current
    rule = dict(num_layers=trainer.num_layers, global_batch=trainer.global_batch,
                current=current, p_min=p_min)
    found = space.candidates(len(devices), **rule)
    ruled_out = tuple(space.ruled_out(len(devices), **rule))
    if not found:
        raise InvalidMeshShape(
            f"no valid mesh on {len(devices)} devices with p_min={p_min}: no pipe width in "
            f"[{p_min}, {space.max_pipe or len(devices)}] is at most num_layers="
            f"{trainer.num_layers} with a data axis dividing global batch "
            f"{trainer.global_batch}: lower p_min or max_pipe ("
            + "; ".join(map(str, ruled_out)) + ")")
    if tried := measure is None:
        def measure(candidate: Candidate) -> TryRunResult:
            return try_run(trainer, state, batches, candidate, devices, timing=timing,
                           memory_budget=budget)
    top_k = (rank.TOP_K if tried else None) if top_k == "auto" else top_k
    results, predictions = _measured(trainer, devices, found, measure, progress, top_k=top_k,
                                     cost_model=cost_model, budget=budget, current=current)
    baseline = like_with_like(baseline, results, current)
    decision = decide(baseline, results, threshold=threshold, remaining_steps=remaining_steps,
                      switch_cost=switch_cost, eps=eps, global_batch=trainer.global_batch,
                      available_devices=len(devices), p_min=p_min)
    decision = dataclasses.replace(decision, ruled_out=ruled_out, predictions=predictions)
    decision = distributed.broadcast(decision)  # one decision: process 0's, everywhere
    log.info("search on %d devices: %s", len(devices), decision.reason)
    return decision


def _measured(trainer: Trainer, devices, found: Sequence[Candidate], measure: Measure,
              progress: Progress | None, *, top_k: int | None, cost_model: CostModel | None,
              budget: int | None, current: MeshShape | None):
    """(results, predictions): every candidate, or the pruned few when there are many."""
    many = top_k is not None and len(found) > top_k + rank.EXTRA + (current is not None)
    if not many and cost_model is None:
        return measure_all(found, measure, progress), ()
    try:
        work = Workload.from_trainer(trainer)
    except Exception as e:  # a model the cost model cannot read: measure everything
        log.warning("no cost model for this model (%s): try-running every candidate", e)
        return measure_all(found, measure, progress), ()
    done: list[TryRunResult] = []
    run = lambda group: done.extend(measure_all(group, measure, progress, start=len(done))) \
        or done[len(done) - len(group):]
    compiled = {c.shape for c in found if trainer.step_key(c.shape, devices) in trainer.cache}
    return rank.pruned_search(found, work, cost_model or CostModel(), run, budget=budget,
                              top_k=top_k if many else None, current=current, compiled=compiled)


def measure_all(found: Sequence[Candidate], measure: Measure,
                progress: Progress | None = None, *, start: int = 0) -> list[TryRunResult]:
    """One result per candidate, in order; a measurement that raises is a failed result
    (the search goes on). `progress` hears each start and end (indices from `start`)."""
    results = []
    for index, candidate in enumerate(found, start):
        if progress is not None:
            progress(TryRunProgress(index, start + len(found), candidate))
        try:
            result = measure(candidate)
        except Exception as e:  # a broken measurement is a failed candidate, not a crash
            log.warning("try-run of %s raised: %s", candidate.shape, e)
            result = TryRunResult.not_run(candidate, failure_status(e))
        results.append(result)
        if progress is not None:
            progress(TryRunProgress(index, start + len(found), candidate, result))
    return results


def _agreed_p_min(trainer: Trainer, devices, budget: int | None) -> int:
    """``p_min="auto"`` resolved (`memory.resolve_p_min`): each process reads its own
    memory analysis; one verdict, process 0's, for all."""
    mine, failure = None, None
    try:
        mine = memory.resolve_p_min(trainer, devices, "auto", budget)
    except InsufficientDevices as e:
        failure = str(e)
    if failure := distributed.failed_anywhere(failure):
        raise InsufficientDevices(failure)
    p_min = distributed.broadcast(mine)
    log.info("p_min auto: %d", p_min)
    return p_min


_SPACE_FIELDS = {f.name for f in dataclasses.fields(SearchSpace)}
_TIMING_FIELDS = {"warmup", "steps"}


def options_from_legacy(space: SearchSpace | None, timing: Timing | None, legacy: dict,
                        where: str) -> tuple[SearchSpace, Timing]:
    """`space` and `timing`, or the same built from the old keywords (deprecated)."""
    unknown = set(legacy) - _SPACE_FIELDS - _TIMING_FIELDS
    if unknown:
        raise TypeError(f"{where}() got unexpected keyword argument(s) {sorted(unknown)}")
    if not legacy:
        return space or SearchSpace(), timing or Timing()
    if space is not None and set(legacy) & _SPACE_FIELDS or \
            timing is not None and set(legacy) & _TIMING_FIELDS:
        raise InvalidArgument(f"{where}(): pass either space=/timing= or the old keywords "
                              f"{sorted(legacy)}, not both")
    warnings.warn(f"{where}({', '.join(f'{k}=' for k in sorted(legacy))}) is deprecated: "
                  "pass space=SearchSpace(...) and timing=Timing(...)", DeprecationWarning,
                  stacklevel=3)
    space = space or SearchSpace(**{k: v for k, v in legacy.items() if k in _SPACE_FIELDS})
    timing = timing or Timing(**{k: v for k, v in legacy.items() if k in _TIMING_FIELDS})
    return space, timing
