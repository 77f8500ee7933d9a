"""Pruned search: the cost model ranks the rule's candidates; only the few best are run.

The rule (`meshscale.planning.space`) says which meshes are valid; this module says which
of them are worth a try-run, so a search compiles a handful of meshes at any cluster size:

1. drop dominated candidates: another candidate has the same largest stage (layers per
   tick) with no more bubble and at least as many replicas; and those whose predicted
   memory is over the budget;
2. rank the rest by predicted samples/s (`meshscale.planning.cost`);
3. try-run the current mesh (the like-for-like baseline) and the top `top_k`;
4. refit the constants to those try-runs and also try-run up to `extra` candidates whose
   prediction is too uncertain to rule out (their optimistic bound, predicted x
   (1 + uncertainty), reaches the best measured).

Every candidate keeps a `Prediction` saying what was predicted, what was measured, and
why it was or was not run. Never: remove a candidate the rule did not produce, add one,
or leave the current mesh unmeasured.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Collection, Sequence

from scipy import stats

from meshscale.layout.mesh import MeshShape
from meshscale.layout.schedule import Schedule
from meshscale.planning.cost import Constants, CostModel, Workload, predict_memory, terms
from meshscale.planning.memory import format_bytes
from meshscale.planning.space import Candidate

# Chosen by measurement (benchmarks/search_regret.py, RESULTS.md): with EXTRA, k <= 3 keeps
# a search within 5 try-runs besides the current mesh; of those, k = 3 had the best
# worst-case and mean regret on 8, 16 and 64 simulated devices (k = 1, 2 lost up to 78%).
TOP_K = 3
EXTRA = 2  # uncertain candidates measured beyond the top k: at most 5 + the current mesh
PRIOR_UNCERTAINTY = 0.5  # relative, while fewer than 3 try-runs calibrate the constants
EXTRAPOLATION_UNCERTAINTY = 0.25  # a pipe width outside the measured ones


@dataclasses.dataclass(frozen=True)
class Prediction:
    """One candidate as the cost model saw it.

    Attributes:
      shape, kind: the candidate.
      samples_per_second, step_seconds, bytes_per_device: predicted (memory: state by the
        sharding rule + gradients + activations).
      uncertainty: relative error to expect of `samples_per_second`.
      rank: 1 = fastest predicted among the candidates not pruned; 0 when pruned.
      verdict: ``"measured: ..."`` (why it was try-run: top k, current mesh, uncertain)
        or ``"not run: ..."`` (dominated by which mesh, over the budget, ranked below).
      measured_samples_per_second: the try-run's figure; nan when not measured or failed.
    """

    shape: MeshShape
    kind: str
    samples_per_second: float
    step_seconds: float
    bytes_per_device: float
    uncertainty: float
    rank: int = 0
    verdict: str = ""
    measured_samples_per_second: float = math.nan

    @property
    def measured(self) -> bool:
        return self.verdict.startswith("measured")


def dominated(found: Sequence[Candidate], num_layers: int) -> dict[MeshShape, MeshShape]:
    """{candidate: a candidate dominating it}: the same layers per tick (largest stage)
    and repeats, no more bubble, at least as many replicas, better in one of them."""
    out: dict[MeshShape, MeshShape] = {}
    scheds = {c.shape: Schedule.of(c.shape, num_layers) for c in found}
    for a in found:
        sa = scheds[a.shape]
        for b in found:
            sb = scheds[b.shape]
            if b.shape == a.shape or (sb.slots, sb.repeats) != (sa.slots, sa.repeats):
                continue
            no_worse = sb.bubble() <= sa.bubble() and b.shape.data >= a.shape.data
            better = sb.bubble() < sa.bubble() or b.shape.data > a.shape.data
            if no_worse and better:
                out[a.shape] = b.shape
                break
    return out


def predict(found: Sequence[Candidate], work: Workload, constants: Constants,
            observed_pipes: Sequence[int] = ()) -> list[Prediction]:
    """A prediction per candidate (candidate order), unranked."""
    base = constants.residual if constants.fitted_from >= 3 else PRIOR_UNCERTAINTY
    out = []
    for c in found:
        seconds = max(constants.seconds(terms(c.shape, work)), 1e-12)
        unc = base
        if observed_pipes and not min(observed_pipes) <= c.shape.pipe <= max(observed_pipes):
            unc = max(unc, EXTRAPOLATION_UNCERTAINTY)
        out.append(Prediction(c.shape, c.kind, work.global_batch / seconds, seconds,
                              predict_memory(c.shape, work), unc))
    return out


def rank(found: Sequence[Candidate], work: Workload, constants: Constants, *,
         budget: int | None = None, current: MeshShape | None = None,
         observed_pipes: Sequence[int] = ()) -> list[Prediction]:
    """Every candidate predicted, pruned ones with their reason, the rest ranked by
    predicted samples/s (ties: fewer devices); fastest first, pruned last."""
    beaten = dominated(found, work.num_layers)
    kept, pruned = [], []
    for p in predict(found, work, constants, observed_pipes):
        if p.shape == current:
            kept.append(p)
        elif p.shape in beaten:
            pruned.append(dataclasses.replace(p, verdict=(
                f"not run: dominated by {beaten[p.shape]} (same largest stage, no more "
                "bubble, at least as many replicas)")))
        elif budget is not None and p.bytes_per_device > budget:
            pruned.append(dataclasses.replace(p, verdict=(
                f"not run: predicted {format_bytes(p.bytes_per_device)} per device, over "
                f"the budget {format_bytes(budget)}")))
        else:
            kept.append(p)
    kept.sort(key=lambda p: (-p.samples_per_second, p.shape.num_devices))
    return [dataclasses.replace(p, rank=i + 1) for i, p in enumerate(kept)] + pruned


Measure = Callable[[Sequence[Candidate]], list]


def pruned_search(found: Sequence[Candidate], work: Workload, cost: CostModel,
                  measure_all: Measure, *, top_k: int | None = TOP_K, extra: int = EXTRA,
                  budget: int | None = None, current: MeshShape | None = None,
                  compiled: Collection[MeshShape] = ()) -> tuple[list, tuple[Prediction, ...]]:
    """Try-run the current mesh and the predicted top `top_k` (None: every candidate), refit,
    then up to `extra` uncertain ones; returns (results in candidate order, every
    candidate's `Prediction`). Candidates already `compiled` take the extra places first
    (they cost no compile); when the top k were all compiled (the search ran before on
    these devices) only compiled ones are extras: a repeated search compiles nothing.

    `measure_all(candidates) -> results` runs try-runs (`TryRunResult`s, same order);
    each result that ran is added to `cost` as an observation.
    """
    by_shape = {c.shape: c for c in found}
    ranked = rank(found, work, cost.constants(), budget=budget, current=current)
    if top_k is None:  # few enough candidates: every one runs, each beside its prediction
        first = [c.shape for c in found]
        why = dict.fromkeys(first, "measured: few enough candidates to try all")
    else:
        first = [p.shape for p in ranked if p.rank and p.shape != current][:top_k]
        why = {s: f"measured: predicted rank {i + 1} (top {top_k})" for i, s in enumerate(first)}
    if current in by_shape and top_k is not None:
        why[current] = "measured: the current mesh (the like-for-like baseline)"
    cheap = [p.shape for p in ranked if p.shape in compiled and p.shape not in why][:extra]
    why.update(dict.fromkeys(cheap, "measured: already compiled (costs no compile)"))
    results = {r.shape: r for r in measure_all([c for c in found if c.shape in why])}
    _observe(cost, work, results.values())
    pipes = [s.pipe for s in results]
    refit = rank(found, work, cost.constants(), budget=budget, current=current,
                 observed_pipes=pipes)
    best = max((r.samples_per_second for r in results.values() if r.ok), default=0.0)
    repeat = top_k is not None and set(first) <= set(compiled)  # this search ran before
    doubtful = [p.shape for p in refit if p.rank and p.shape not in why
                and (p.shape in compiled or not repeat)
                and p.samples_per_second * (1 + p.uncertainty) >= best][:extra - len(cheap)]
    for s in doubtful:
        why[s] = "measured: prediction too uncertain to rule out"
    more = {r.shape: r for r in measure_all([by_shape[s] for s in doubtful])}
    _observe(cost, work, more.values())
    results.update(more)
    final = rank(found, work, cost.constants(), budget=budget, current=current,
                 observed_pipes=[s.pipe for s in results])
    predictions = []
    for p in final:
        if p.shape in why:
            r = results[p.shape]
            p = dataclasses.replace(p, verdict=why[p.shape], measured_samples_per_second=(
                r.samples_per_second if r.ok else math.nan))
        elif p.rank:
            p = dataclasses.replace(p, verdict=(
                f"not run: predicted rank {p.rank}, below the top {top_k}; even "
                f"{p.uncertainty:+.0%} would not reach the best measured"))
        predictions.append(p)
    return [results[c.shape] for c in found if c.shape in results], tuple(predictions)


def _observe(cost: CostModel, work: Workload, results) -> None:
    for r in results:
        if r.ok and r.samples_per_second > 0:
            seconds = r.step_seconds if math.isfinite(r.step_seconds) and r.step_seconds > 0 \
                else work.global_batch / r.samples_per_second
            cost.observe(r.shape, work, seconds)


def spearman(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Spearman's rank correlation of two equally long sequences (scipy's; nan if < 2)."""
    if len(xs) < 2:
        return math.nan
    return float(stats.spearmanr(xs, ys).statistic)


def plan(trainer, n_devices: int, *, space, cost_model: CostModel | None = None,
         current: MeshShape | None = None, budget: int | None = None,
         backend: str | None = None) -> list[Prediction]:
    """The ranked candidates for `n_devices` devices that need not exist: nothing runs,
    and the only compiles are the cost model's (one layer, embed + head) on one device.

    Args:
      trainer: a `Trainer`, typically of an abstract model (a constructor), with an
        ``example_batch`` of `jax.ShapeDtypeStruct`s.
      space: the `SearchSpace` (an int ``p_min``).
      cost_model: calibration to rank with (e.g. loaded from a run on this hardware);
        None: the backend's prior constants.
      budget: bytes per device; candidates predicted over it are marked not run.
      backend: whose prior constants rank an uncalibrated plan (``"gpu"``, ``"tpu"``,
        ``"cpu"``); default: this process's backend.
    """
    found = space.candidates(n_devices, num_layers=trainer.num_layers,
                             global_batch=trainer.global_batch, current=current)
    constants = (cost_model or CostModel(backend=backend or CostModel().backend)).constants()
    ranked = rank(found, Workload.from_trainer(trainer), constants, budget=budget,
                  current=current)
    return [dataclasses.replace(p, verdict=p.verdict or f"planned: rank {p.rank}")
            for p in ranked]
