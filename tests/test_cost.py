"""The cost model and the pruned search: dominance, calibration, ranking at cluster scale,
planning for hardware that is not there. Compile-free except where a model is read."""

import math

import numpy as np
import pytest

from meshscale.layout.mesh import MeshShape
from meshscale.layout.schedule import Schedule
from meshscale.planning import rank
from meshscale.planning.cost import TERMS, Constants, CostModel, Workload, fit, terms
from meshscale.planning.space import SearchSpace, candidates
from meshscale.planning.tryrun import TryRunResult

# Llama-3-70B-like numbers per example (no compile): what `Workload.from_trainer` reads
# from XLA, written down, so the cluster-scale checks cost nothing.
BIG = Workload(num_layers=80, global_batch=4096, layer_flops=6e13, layer_bytes=6e11,
               outer_flops=5e13, outer_bytes=4.6e11, activation_bytes=2.7e8,
               layer_temp_bytes=7e9, layer_param_bytes=3.4e9, other_param_bytes=8.4e9)
# A machine whose devices share nothing: compute, links, per-tick latency, fixed cost.
TRUE = Constants((1 / 300e12, 0.0, 1 / 3e12, 1 / 50e9, 4e-4, 0.0, 0.02))


def synthetic(candidate, work=BIG, constants=TRUE):
    """An injected try-run: the step time the known constants give (no timing decides)."""
    seconds = constants.seconds(terms(candidate.shape, work))
    sps = work.global_batch / seconds
    return TryRunResult(candidate.shape, candidate.kind, "ok", step_seconds=seconds,
                        samples_per_second=sps, num_devices=candidate.shape.num_devices)


def test_dominated_candidates_share_the_largest_stage_with_more_bubble_and_no_more_replicas():
    found = candidates(64, p_min=2, num_layers=80, global_batch=4096)
    beaten = rank.dominated(found, 80)
    shapes = {c.shape for c in found}
    assert beaten and set(beaten) <= shapes and set(beaten.values()) <= shapes
    for loser, winner in beaten.items():
        a, b = Schedule.of(loser, 80), Schedule.of(winner, 80)
        assert (a.slots, a.repeats) == (b.slots, b.repeats)
        assert b.bubble() <= a.bubble() and winner.data >= loser.data
        assert b.bubble() < a.bubble() or winner.data > loser.data
    # 27..39 stages all run 3 layers a tick; 27x2 has the least bubble and most replicas
    by_pipe = {s.pipe: s for s in shapes}
    assert by_pipe[39] in beaten and by_pipe[32] in beaten and by_pipe[27] not in beaten
    ranked = rank.rank(found, BIG, TRUE, budget=int(80e9), current=by_pipe[39])
    assert {p.shape for p in ranked} == shapes  # pruning removes, never adds
    assert next(p for p in ranked if p.shape == by_pipe[39]).rank > 0  # current never pruned
    over = [p for p in ranked if "over the budget" in p.verdict]
    assert over and all(p.bytes_per_device > 80e9 and p.rank == 0 for p in over)
    kept = [p.samples_per_second for p in ranked if p.rank]
    assert kept == sorted(kept, reverse=True)


def test_calibration_recovers_known_constants_from_injected_measurements(tmp_path):
    shapes = [c.shape for n in (64, 256, 1024)
              for c in candidates(n, p_min=2, num_layers=80, global_batch=4096)]
    counts = [terms(s, BIG) for s in shapes]
    seconds = [TRUE.seconds(c) for c in counts]
    fitted = fit(counts, seconds, prior=Constants.prior("gpu"), ridge=0.0)
    for name, want, got in zip(TERMS, TRUE.values, fitted.values, strict=True):
        assert got == pytest.approx(want, rel=1e-3, abs=1e-9 * max(TRUE.values)), name
    assert fitted.fitted_from == len(shapes) and fitted.residual < 1e-6
    # the default ridge toward a prior 10x off still predicts within 1%
    model = CostModel(backend="gpu")
    for s, t in zip(shapes[::7], seconds[::7], strict=True):
        model.observe(s, BIG, t)
    held_out = [(c, t) for c, t in zip(counts[3::7], seconds[3::7], strict=True)]
    constants = model.constants()
    assert max(abs(constants.seconds(c) / t - 1) for c, t in held_out) < 0.01
    model.save(tmp_path / "cost.json")  # stored with the run, the next search reuses it
    again = CostModel.load(tmp_path / "cost.json")
    assert again.observations == model.observations
    assert again.constants().values == pytest.approx(constants.values)
    assert CostModel.load(tmp_path / "none.json").observations == []


@pytest.mark.parametrize("n", [64, 128, 256])
def test_pruned_search_on_simulated_clusters_runs_few_keeps_current_and_finds_the_best(n):
    found = candidates(n, p_min=2, num_layers=80, global_batch=4096)
    current = found[len(found) // 2].shape
    asked = []

    def measure(group):
        asked.extend(c.shape for c in group)
        return [synthetic(c) for c in group]

    results, predictions = rank.pruned_search(found, BIG, CostModel(backend="gpu"), measure,
                                              current=current)
    assert len(asked) == len(set(asked)) <= rank.TOP_K + rank.EXTRA + 1 < len(found)
    assert current in asked and set(asked) <= {c.shape for c in found}
    truth = {c.shape: synthetic(c).samples_per_second for c in found}
    chosen = max(results, key=lambda r: r.samples_per_second).shape
    assert truth[chosen] >= 0.95 * max(truth.values())
    assert [p.shape for p in predictions if p.measured] and \
        {p.shape for p in predictions} == set(truth)
    for p in predictions:  # predicted beside measured, and why each was (not) run
        assert p.verdict.startswith("measured" if p.shape in asked else "not run"), p
        assert math.isnan(p.measured_samples_per_second) != (p.shape in asked)
    kept = [p for p in predictions if p.rank]
    assert rank.spearman([p.samples_per_second for p in kept],
                         [truth[p.shape] for p in kept]) >= 0.8
    # repeated with those executables compiled: it compiles nothing new
    first, asked[:] = set(asked), []
    rank.pruned_search(found, BIG, CostModel(backend="gpu"), measure, current=current,
                       compiled=first)
    assert set(asked) <= first


def test_plan_for_4096_devices_of_llama_70b_compiles_only_abstractly():
    import time

    import jax
    import optax
    from flax import nnx
    from meshscale.models.llama import Llama, LlamaConfig

    from meshscale import Trainer

    cfg = LlamaConfig.preset("70b")
    example = {"tokens": jax.ShapeDtypeStruct((4096, cfg.seq_len + 1), "int32")}
    start = time.perf_counter()
    trainer = Trainer(lambda: Llama(cfg, rngs=nnx.Rngs(0)), optax.adam(1e-4),
                      global_batch=4096, example_batch=example)
    ranked = rank.plan(trainer, 4096, space=SearchSpace(p_min=2), backend="gpu",
                       budget=int(141e9))
    seconds = time.perf_counter() - start
    assert len(ranked) == len(candidates(4096, p_min=2, num_layers=80, global_batch=4096))
    assert ranked[0].rank == 1 and ranked[0].samples_per_second > 0
    assert all(p.shape.num_devices <= 4096 for p in ranked)
    # state by the sharding rule: 70.6B params x (4 + 8 Adam) bytes / 4096 devices at least
    assert min(p.bytes_per_device for p in ranked) > 70e9 * 12 / 4096
    print(f"plan: 4096 devices, llama-70b, {len(ranked)} candidates in {seconds:.1f} s")


def test_search_prunes_with_injected_measurements_and_reports_predictions(devices):
    from helpers import GLOBAL_BATCH, make_model, make_optimizer, prefer_more_devices

    from meshscale import Trainer, search

    trainer = Trainer(make_model("mlp"), make_optimizer(), global_batch=GLOBAL_BATCH)
    current = MeshShape(2, 2, 2)
    found = SearchSpace(p_min=1).candidates(8, num_layers=8, global_batch=GLOBAL_BATCH,
                                            current=current)
    ran = []

    def measure(candidate):
        ran.append(candidate.shape)
        return prefer_more_devices(candidate, GLOBAL_BATCH)

    cost = CostModel()
    decision = search(trainer, None, [], devices, space=SearchSpace(p_min=1), top_k=1,
                      measure=measure, current=current, cost_model=cost)
    assert len(ran) <= 1 + rank.EXTRA + 1 < len(found) and current in ran
    assert [r.shape for r in decision.results] == [c.shape for c in found if c.shape in ran]
    assert {p.shape for p in decision.predictions} == {c.shape for c in found}
    assert len(cost.observations) == len(ran)  # calibrated by this search's try-runs
    measured = {p.shape: p for p in decision.predictions if p.measured}
    assert set(measured) == set(ran)
    for r in decision.results:
        assert measured[r.shape].measured_samples_per_second == r.samples_per_second
        assert np.isfinite(measured[r.shape].samples_per_second)
    # the precompiler prepares what a pruned search would try: current + top k + extras
    from meshscale.planning.precompile import Precompiler

    pre = Precompiler(trainer, space=SearchSpace(p_min=1), top_k=1, cost_model=cost)
    try:
        likely = [c.shape for c in pre._likely(found, current)]
    finally:
        pre.close()
    ranked = [p.shape for p in rank.rank(found, Workload.from_trainer(trainer),
                                         cost.constants(), current=current)
              if p.rank and p.shape != current]
    assert set(likely) == {current, *ranked[:1 + rank.EXTRA]} and len(likely) < len(found)
