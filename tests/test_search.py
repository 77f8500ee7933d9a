"""The decision (meshscale.planning.search) over injected measurements: no compiles here."""

import math
import types

import pytest

from meshscale import Baseline, Candidate, MeshShape, SearchSpace, TryRunResult, search
from meshscale.errors import MeshscaleError
from meshscale.planning.search import decide, payback_seconds

P_MIN_2 = SearchSpace(p_min=2)

BATCH = 32
FAKE_TRAINER = types.SimpleNamespace(num_layers=8, global_batch=BATCH)


def ran(shape: str, sps: float, kind: str = "vertical") -> TryRunResult:
    s = MeshShape.parse(shape)
    return TryRunResult(s, kind, "ok", step_seconds=BATCH / sps, step_spread=0.0,
                        samples_per_second=sps, samples_per_second_per_device=sps / s.num_devices,
                        num_devices=s.num_devices)


def failed(shape: str) -> TryRunResult:
    s = MeshShape.parse(shape)
    return TryRunResult(s, "vertical", "failed: RuntimeError: boom", num_devices=s.num_devices)


def base(sps: float, shape: str = "2x2/m2") -> Baseline:
    s = MeshShape.parse(shape)
    return Baseline(sps, s.num_devices, s)


def test_switch_when_improvement_above_threshold():
    d = decide(base(100.0), [ran("2x2/m2", 100.0, "current"), ran("2x4/m2", 150.0)])
    assert d.switch and d.best.shape == MeshShape(2, 4, 2)
    assert d.improvement == pytest.approx(0.5)
    assert d.target == MeshShape(2, 4, 2)
    assert "switch" in d.reason and "+50.0%" in d.reason


def test_improvement_exactly_at_threshold_does_not_switch():
    d = decide(base(100.0), [ran("2x4/m2", 125.0)], threshold=0.25)
    assert d.improvement == 0.25 and not d.switch
    assert "not above the threshold" in d.reason
    d5 = decide(base(100.0), [ran("2x4/m2", 105.0)], threshold=0.05)
    assert not d5.switch and d5.target == MeshShape(2, 2, 2)
    assert decide(base(100.0), [ran("2x4/m2", 105.1)], threshold=0.05).switch


def test_ties_prefer_fewer_devices_then_the_current_mesh():
    d = decide(base(50.0), [ran("2x4/m2", 100.0), ran("4x1/m4", 100.0), ran("2x2/m2", 100.0)])
    assert d.best.shape == MeshShape(4, 1, 4)
    same = decide(base(50.0, "4x1/m4"),
                  [ran("2x2/m2", 100.0), ran("4x1/m4", 100.0, "current")])
    assert same.best.kind == "current" and not same.switch
    assert "is the fastest measured" in same.reason


def test_failed_candidate_is_recorded_and_search_goes_on(devices):
    def measure(c: Candidate) -> TryRunResult:
        if c.shape.pipe == 4:
            raise RuntimeError("RESOURCE_EXHAUSTED: out of memory while allocating")
        if c.shape.pipe == 8:
            return failed(str(c.shape))
        return ran(str(c.shape), 130.0 if c.shape.pipe == 2 else 120.0, c.kind)

    d = search(FAKE_TRAINER, None, [], devices, space=P_MIN_2, measure=measure)
    assert [str(r.shape) for r in d.results] == ["2x4/m4", "3x2/m8", "4x2/m8", "5x1/m16",
                                                 "6x1/m16", "7x1/m16", "8x1/m16"]
    statuses = [r.status for r in d.results]
    assert statuses[0] == statuses[1] == "ok"
    assert statuses[2].startswith("failed: out of memory")
    assert statuses[6].startswith("failed: RuntimeError")
    assert d.best.shape == MeshShape(2, 4, 4) and d.switch  # start-up: no baseline


def test_no_candidate_ran_means_no_switch():
    d = decide(base(100.0), [failed("2x4/m2"), failed("4x2/m4")])
    assert d.best is None and not d.switch and math.isnan(d.improvement)
    assert d.max_useful_devices is None and "no candidate ran" in d.reason
    assert d.target == MeshShape(2, 2, 2)


def test_payback_not_met_does_not_switch():
    # 100 -> 200 samples/s saves 0.16 s per 32-example step: 16 s over 100 steps
    saved = payback_seconds(100.0, 200.0, BATCH, 100)
    assert saved == pytest.approx(16.0)
    kw = dict(remaining_steps=100, global_batch=BATCH)
    stay = decide(base(100.0), [ran("2x4/m2", 200.0)], switch_cost=20.0, **kw)
    assert not stay.switch and "switch cost 20.0s" in stay.reason
    go = decide(base(100.0), [ran("2x4/m2", 200.0)], switch_cost=10.0, **kw)
    assert go.switch and "saves 16.0s" in go.reason
    # global batch implied by the best result's step time gives the same answer
    assert not decide(base(100.0), [ran("2x4/m2", 200.0)], switch_cost=20.0,
                      remaining_steps=100).switch
    # without remaining steps there is no payback test
    assert decide(base(100.0), [ran("2x4/m2", 200.0)], switch_cost=1e9).switch


def test_max_useful_devices_is_fewest_within_eps_of_best():
    results = [ran("2x1/m2", 60.0), ran("2x2/m2", 96.0), ran("2x3/m2", 99.0),
               ran("2x4/m2", 100.0)]
    d = decide(base(60.0, "2x1/m2"), results, eps=0.05)
    assert d.best.shape == MeshShape(2, 4, 2)
    assert d.max_useful_devices == 4  # 96 >= 95
    assert decide(None, results, eps=0.01).max_useful_devices == 6
    assert decide(None, results, eps=0.5).max_useful_devices == 2


def test_start_up_without_baseline_switches_to_best():
    d = decide(None, [ran("2x4/m2", 80.0), ran("4x2/m4", 90.0)])
    assert d.switch and math.isnan(d.improvement) and d.best.shape == MeshShape(4, 2, 4)
    assert "start-up" in d.reason
    stalled = decide(base(0.0), [ran("2x4/m2", 80.0)])
    assert stalled.switch and stalled.improvement == math.inf


def test_lost_devices_force_a_switch_even_when_slower():
    d = decide(base(100.0, "2x4/m2"), [ran("2x2/m2", 60.0, "current")], available_devices=6)
    assert d.switch and d.improvement == pytest.approx(-0.4)
    assert "only 6 available" in d.reason


def test_search_passes_candidates_in_order_and_uses_baseline_shape(devices):
    seen = []

    def measure(c):
        seen.append((str(c.shape), c.kind))
        return ran(str(c.shape), 100.0 + c.shape.data, c.kind)

    d = search(FAKE_TRAINER, None, [], devices[:6], space=P_MIN_2, baseline=base(100.0, "2x2/m2"),
               measure=measure)
    # 6 % 2 == 0 but B % 3 != 0: pipe 2 stays at data 2; every pipe width up to 6 is tried.
    assert seen == [("2x2/m2", "current"), ("3x2/m8", "vertical"), ("4x1/m8", "vertical"),
                    ("5x1/m16", "vertical"), ("6x1/m16", "vertical")]
    assert not d.switch  # the current mesh is the fastest


def test_baseline_from_step_times_skips_compile_and_warmup():
    b = Baseline.from_step_times([9.0, 1.0, 0.5, 0.4, 0.6, 5.0], BATCH, MeshShape(2, 2, 2),
                                 skip=2)
    assert b.samples_per_second == pytest.approx(BATCH / 0.55)
    assert b.num_devices == 4 and b.shape == MeshShape(2, 2, 2)
    with pytest.raises(ValueError, match="no step times"):
        Baseline.from_step_times([1.0, 2.0], BATCH, MeshShape(1, 1), skip=2)


def test_auto_p_min_without_budget_on_cpu_says_what_to_pass(devices):
    with pytest.raises(MeshscaleError, match="memory_budget"):
        search(FAKE_TRAINER, None, [], devices, space=SearchSpace(p_min="auto"),
               measure=lambda c: None)


def test_the_current_meshs_own_try_run_is_the_baseline_like_with_like(devices):
    """The demo's case: ordinary steps said 130 samples/s, but side by side the current
    mesh's try-run and the other's measured 74 and 73: compare the try-runs, stay."""
    speeds = {MeshShape.parse("2x2/m2"): 74.0, MeshShape.parse("4x1/m8"): 73.0}
    measure = lambda c: ran(str(c.shape), speeds[c.shape], c.kind)  # noqa: E731
    steps_baseline = base(130.0, "2x2/m2")
    d = search(FAKE_TRAINER, None, [], devices[:6], space=P_MIN_2, baseline=steps_baseline,
               measure=measure)
    assert d.baseline.source == "try-run" and d.baseline.samples_per_second == 74.0
    assert d.improvement == pytest.approx(0.0) and not d.switch  # best is the current mesh
    # too few ordinary steps (no baseline): the current mesh's try-run, not the start-up rule
    speeds[MeshShape.parse("4x1/m8")] = 75.0
    d = search(FAKE_TRAINER, None, [], devices[:6], space=P_MIN_2,
               current=MeshShape.parse("2x2/m2"), measure=measure)
    assert d.baseline.source == "try-run" and not d.switch  # +1.4%: below the threshold
    assert d.improvement == pytest.approx(75.0 / 74.0 - 1.0)
    # the current mesh's try-run failed: the ordinary steps' baseline is all there is
    failing = lambda c: failed(str(c.shape)) if c.kind == "current" else measure(c)  # noqa: E731
    d = search(FAKE_TRAINER, None, [], devices[:6], space=P_MIN_2, baseline=steps_baseline,
               measure=failing)
    assert d.baseline == steps_baseline and not d.switch


def test_old_search_keywords_still_work_deprecated_and_never_mix_with_space(devices):
    measure = lambda c: ran(str(c.shape), 100.0 + c.shape.pipe, c.kind)
    new = search(FAKE_TRAINER, None, [], devices, space=SearchSpace(p_min=2, max_pipe=3),
                 measure=measure)
    with pytest.warns(DeprecationWarning, match="pass space=SearchSpace"):
        old = search(FAKE_TRAINER, None, [], devices, p_min=2, max_pipe=3, measure=measure)
    assert [r.shape for r in old.results] == [r.shape for r in new.results]
    assert max(r.shape.pipe for r in new.results) == 3
    with pytest.raises(MeshscaleError, match="not both"):
        search(FAKE_TRAINER, None, [], devices, space=P_MIN_2, p_min=2, measure=measure)
    with pytest.raises(TypeError, match="unexpected keyword"):
        search(FAKE_TRAINER, None, [], devices, space=P_MIN_2, warmpu=1, measure=measure)


def test_search_reports_each_try_run_to_progress_and_says_what_it_ruled_out(devices):
    heard = []

    def measure(c):
        if c.shape.pipe == 3:
            raise RuntimeError("boom")
        return ran(str(c.shape), 100.0, c.kind)

    d = search(FAKE_TRAINER, None, [], devices[:6], space=P_MIN_2, measure=measure,
               progress=lambda p: heard.append(
                   (p.index, p.total, str(p.candidate.shape),
                    None if p.result is None else p.result.status)))
    shapes = [str(r.shape) for r in d.results]
    assert heard == [x for i, s in enumerate(shapes) for x in (
        (i, len(shapes), s, None),
        (i, len(shapes), s, "failed: RuntimeError: boom" if s.startswith("3x") else "ok"))]
    # B=32 on 6 devices: 3 replicas of pipe 2 do not divide it; pipe 1 is below p_min
    assert [str(w) for w in d.ruled_out] == [
        "pipe 1: fewer stages than p_min 2",
        "2x3: global batch 32 does not split into 3 replicas: 2x2 (4 of 6 devices) is "
        "tried instead"]
