"""ElasticTrainer: device changes keep the loss trajectory; failures never lose state."""

import dataclasses
import functools
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import optax
import pytest
from meshscale.models.mlp import MLPConfig, ResidualMLP

from meshscale import (
    CheckpointPolicy,
    CompileCache,
    IncompatibleCheckpoint,
    InsufficientDevices,
    InvalidArgument,
    MeshShape,
    ResourceError,
    SearchSpace,
    SwitchPolicy,
    Timing,
    Trainer,
    resources,
)
from meshscale.elastic.trainer import ElasticTrainer
from meshscale.planning.memory import bytes_per_device
from meshscale.planning.space import candidates
from tests.helpers import DEEP_TOL, assert_trees_close, make_model, prefer_more_devices

BATCH = 24
OPTIMIZER = optax.adam(1e-2)  # one object: compiled steps are shared between the tests
CACHE = CompileCache(maxsize=64)


def example_batches(count: int) -> list[dict]:
    """Batches 0..count-1 of the test MLP. example_batch reads only the config and the
    seed, so one model makes them all (a model per batch cost 3 s of every import of this
    module: each xdist worker's, and each test_never_lose_work child's)."""
    mlp = make_model("mlp")
    return [mlp.example_batch(BATCH, seed=i) for i in range(count)]


BATCHES = example_batches(30)


OPEN: list[ElasticTrainer] = []  # closed after each test: no write outlives its test


@pytest.fixture(autouse=True)
def close_trainers():
    yield
    while OPEN:
        OPEN.pop().close()


def elastic(tmp_path, source, *, model=None, example_batch=None, skip_nonfinite=False,
            space=None, timing=None, switching=None, checkpoints=None, metrics=None):
    """An MLP run in ``tmp_path/run`` on the shared compile cache CACHE, with no persistent
    cache; unless given, p_min is 2 and the devices are checked every 5 steps."""
    trainer = ElasticTrainer(
        Trainer(model or make_model("mlp"), OPTIMIZER, global_batch=BATCH,
                example_batch=example_batch, skip_nonfinite=skip_nonfinite, cache=CACHE),
        checkpoint_dir=tmp_path / "run", resources=source,
        space=space or SearchSpace(p_min=2), timing=timing,
        switching=switching or SwitchPolicy(check_every=5),
        checkpoints=dataclasses.replace(checkpoints or CheckpointPolicy(),
                                        persistent_cache=False),
        metrics=metrics)
    OPEN.append(trainer)
    return trainer


class Schedule:
    """A scheduler stand-in: the device count in force from each step on."""

    def __init__(self, changes):
        self.changes, self.step = changes, 0

    def __call__(self):
        return [n for start, n in sorted(self.changes.items()) if start <= self.step][-1]


@functools.cache
def fixed_mesh_run(steps):
    shape = MeshShape(2, 1, 2)
    trainer = Trainer(make_model("mlp"), OPTIMIZER, global_batch=BATCH, cache=CACHE)
    state, step, losses = trainer.init_state(shape), trainer.compile_step(shape), []
    for i in range(steps):
        state, metrics = step(state, trainer.put_batch(BATCHES[i], shape))
        losses.append(float(metrics["loss"]))
    return losses, jax.device_get(state.params)


def run(trainer, schedule, steps, first=0, state=None):
    state = state if state is not None else trainer.init(BATCHES[0])
    losses = []
    for i in range(first, steps):
        schedule.step = i
        state, metrics = trainer.step(state, BATCHES[i])
        losses.append(metrics["loss"])
    return state, losses


def events(trainer, kind):
    return [e for e in trainer.history if e["event"] == kind]


def test_device_changes_keep_every_loss_with_real_try_runs(tmp_path):
    """4 -> 8 -> 6 -> 3 -> 8 devices, p_min 2: same losses as a fixed mesh at every step."""
    schedule = Schedule({0: 4, 4: 8, 9: 6, 14: 3, 19: 8})
    trainer = elastic(tmp_path, resources.Callback(schedule),
                      space=SearchSpace(p_min=2, max_pipe=4), timing=Timing(warmup=1, steps=2))
    state, losses = run(trainer, schedule, 25)
    expected, params = fixed_mesh_run(25)
    np.testing.assert_allclose(losses, expected, rtol=1e-5)
    assert_trees_close(trainer.trainer.model_params(jax.device_get(state.params)), params,
                       DEEP_TOL, "final params")
    changes = events(trainer, "devices_changed")
    assert [e["after"] for e in changes] == [8, 6, 3, 8]
    # Which mesh a timed try-run picks is up to the clock; what holds whatever it picks:
    # a mesh on more than 3 devices when the change to 3 comes forces a switch (3x1, a
    # mesh of 3 uneven stages, may already run and then stays), and every mesh run after
    # a change fits the devices granted.
    switches = events(trainer, "switch")
    running = [e for e in switches if (e["step"] or 0) < 15][-1]
    if MeshShape.parse(running["after"]).num_devices > 3:
        assert any(e["step"] == 15 and e["num_devices"] <= 3
                   and e["reason"].startswith("forced") for e in switches)
    for change in changes:
        after = trainer.history[trainer.history.index(change):]
        switch = next((e for e in after if e["event"] == "switch"), None)
        if switch is not None and switch["step"] == change["step"]:
            assert switch["num_devices"] <= change["after"]
    for change in changes:  # the checkpoint is written before the search, every time
        after = trainer.history[trainer.history.index(change):]
        kinds = [e["event"] for e in after]
        assert kinds.index("checkpoint") < kinds.index("search")
    assert trainer.shape.num_devices <= 8


def test_switching_at_every_change_keeps_every_loss_when_devices_are_not_a_multiple(tmp_path):
    """p_min 4 with 6 devices (not a multiple): vertical only; restored state is exact."""
    schedule = Schedule({0: 4, 4: 8, 9: 6, 14: 4, 19: 8})
    trainer = elastic(tmp_path, resources.Callback(schedule), space=SearchSpace(p_min=4),
                      switching=SwitchPolicy(check_every=5, measure=prefer_more_devices))
    state, losses = run(trainer, schedule, 25)
    expected, params = fixed_mesh_run(25)
    np.testing.assert_allclose(losses, expected, rtol=1e-5)
    assert_trees_close(trainer.trainer.model_params(jax.device_get(state.params)), params,
                       DEEP_TOL, "final params")
    searches = events(trainer, "search")
    six = next(e for e in searches if e["num_devices"] == 6)
    assert all(r.shape.data <= 1 for r in six["decision"].results)  # data axis never grew
    assert len(events(trainer, "switch")) >= 4  # start + a switch at most changes


def prefer_uneven_and_circular(candidate):
    """Injected measurements: more devices, then more replicas, are faster, and so are
    uneven splits (a pipe width not dividing the 8 layers) and, on 8 devices, the circular
    schedule: the run below then switches between even, uneven and circular meshes."""
    shape = candidate.shape
    bonus = 0.5 * (8 % shape.pipe != 0) + 0.25 * (shape.repeats > 1 and shape.num_devices == 8)
    speed = 1e9 * (shape.num_devices + 0.1 * shape.data + bonus)
    return dataclasses.replace(prefer_more_devices(candidate, BATCH), step_seconds=BATCH / speed,
                               samples_per_second=speed,
                               samples_per_second_per_device=speed / shape.num_devices)


def test_switches_between_even_uneven_and_circular_meshes_keep_every_loss(tmp_path):
    """4 -> 7 -> 6 -> 8 -> 5 devices: 8 layers on 2, 7, 3, 2 (circular) and 5 stages."""
    schedule = Schedule({0: 4, 4: 7, 9: 6, 14: 8, 19: 5})
    trainer = elastic(tmp_path, resources.Callback(schedule),
                      space=SearchSpace(p_min=2, repeats="all"),
                      switching=SwitchPolicy(check_every=5, measure=prefer_uneven_and_circular))
    state, losses = run(trainer, schedule, 25)
    expected, params = fixed_mesh_run(25)
    np.testing.assert_allclose(losses, expected, rtol=1e-5)
    assert_trees_close(trainer.trainer.model_params(jax.device_get(state.params)), params,
                       DEEP_TOL, "final params")
    meshes = [e["after"] for e in events(trainer, "switch")]
    assert meshes == ["2x2/m4", "7x1/m24", "3x2/m6", "2x4/m6/r2", "5x1/m12"]
    assert [trainer.trainer.rows(MeshShape.parse(m)) for m in meshes] == [8, 14, 9, 8, 10]


def test_try_runs_that_fit_only_without_the_live_state_release_and_restore_it(tmp_path):
    """A budget every candidate fits alone but none beside the live state: the live state
    is released after the pre-search checkpoint and read back; no loss changes."""
    schedule = Schedule({0: 2, 4: 4})
    trainer = elastic(tmp_path, resources.Callback(schedule), timing=Timing(warmup=0, steps=1))
    found = [c.shape for n in (2, 4) for c in candidates(n, p_min=2, num_layers=8,
                                                          global_batch=BATCH)]
    needs = [bytes_per_device(trainer.trainer.compile_step(s)) for s in found]
    trainer.space = dataclasses.replace(trainer.space, memory_budget=max(needs) + 1)
    state, losses = run(trainer, schedule, 10)
    expected, params = fixed_mesh_run(10)
    np.testing.assert_allclose(losses, expected, rtol=1e-5)
    assert_trees_close(trainer.trainer.model_params(jax.device_get(state.params)), params,
                       DEEP_TOL, "final params")
    assert len(events(trainer, "restore")) == 2  # at start-up and at the change


def test_a_try_run_that_raises_does_not_disturb_training(tmp_path):
    def flaky(candidate):
        if candidate.shape.data == 4:
            raise RuntimeError("simulated try-run crash")
        return prefer_more_devices(candidate)

    schedule = Schedule({0: 4, 4: 8})
    trainer = elastic(tmp_path, resources.Callback(schedule),
                      switching=SwitchPolicy(check_every=5, measure=flaky))
    state, losses = run(trainer, schedule, 10)
    np.testing.assert_allclose(losses, fixed_mesh_run(10)[0], rtol=1e-5)
    results = events(trainer, "search")[-1]["decision"].results
    assert any(r.status.startswith("failed: RuntimeError: simulated") for r in results)
    assert trainer.shape.data != 4


def test_below_p_min_saves_then_refuses_to_go_on(tmp_path):
    schedule = Schedule({0: 4, 4: 1})
    trainer = elastic(tmp_path, resources.Callback(schedule),
                      switching=SwitchPolicy(check_every=5, measure=prefer_more_devices))
    with pytest.raises(InsufficientDevices, match="needs p_min=2: wait for at least 2"):
        run(trainer, schedule, 10)
    assert trainer.checkpointer.latest_step() == 5


def test_init_refuses_too_few_devices_and_leaves_the_checkpoints_alone(tmp_path):
    schedule = Schedule({0: 4})
    first = elastic(tmp_path, resources.Callback(schedule),
                    switching=SwitchPolicy(check_every=5, measure=prefer_more_devices),
                    checkpoints=CheckpointPolicy(every=2))
    run(first, schedule, 4)
    first.checkpointer.wait()
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "run").rglob("*"))
    with pytest.raises(InsufficientDevices, match="1 devices available, the model needs p_min=2"):
        elastic(tmp_path, resources.Static(1)).init(BATCHES[0])
    other = ResidualMLP(MLPConfig(num_layers=8, features=24, hidden=32),
                        rngs=__import__("flax").nnx.Rngs(0))
    with pytest.raises(IncompatibleCheckpoint):
        elastic(tmp_path, resources.Static(4), model=other,
                example_batch=other.example_batch(BATCH)).init(BATCHES[0])
    after = sorted(p.relative_to(tmp_path) for p in (tmp_path / "run").rglob("*"))
    assert before == after


def test_bad_options_are_refused(tmp_path):
    with pytest.raises(InvalidArgument, match="p_min=9 is larger than the model's 8 layers"):
        elastic(tmp_path, resources.Static(8), space=SearchSpace(p_min=9))
    with pytest.raises(InvalidArgument, match="switch_via must be"):
        elastic(tmp_path, resources.Static(8), switching=SwitchPolicy(via="teleport"))
    with pytest.raises(ResourceError):
        resources.FileSource(tmp_path / "missing.txt")
    bad = tmp_path / "devices.txt"
    bad.write_text("lots of devices please\n")
    with pytest.raises(ResourceError):
        resources.FileSource(bad)


def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
    schedule = Schedule({0: 4})
    first = elastic(tmp_path, resources.Callback(schedule),
                    switching=SwitchPolicy(check_every=5, measure=prefer_more_devices),
                    checkpoints=CheckpointPolicy(every=2))
    run(first, schedule, 4)
    first.checkpointer.wait()
    latest = first.checkpointer.latest_step()
    assert latest == 4
    step_dir = next(p for p in (tmp_path / "run" / "state").iterdir() if p.name == "4")
    for f in step_dir.rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(b"\0garbage")
    schedule = Schedule({0: 4, 3: 8})  # seen by the check after step 4: the damaged step
    second = elastic(tmp_path, resources.Callback(schedule),
                     switching=SwitchPolicy(check_every=2, measure=prefer_more_devices))
    with caplog.at_level("WARNING"):
        state = second.init(BATCHES[0])
    assert int(state.step) == 2
    assert "fall" in caplog.text.lower() or "previous" in caplog.text.lower()
    # Training passes step 4 again: the save before the search replaces the damaged step
    # (moved aside, not deleted), and the switch restores step 4, not step 2 behind it.
    state, losses = run(second, schedule, 8, first=2, state=state)
    np.testing.assert_allclose(losses, fixed_mesh_run(8)[0][2:], rtol=1e-5)
    assert second.shape.num_devices == 8 and int(state.step) == 8
    assert (step_dir.parent / "4.damaged").is_dir()
    assert 4 in second.checkpointer.all_steps()


def test_sigkill_after_the_presearch_checkpoint_resumes_on_another_device_count(tmp_path):
    marker = tmp_path / "searching"
    root = str(pathlib.Path(__file__).resolve().parents[1])
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys, time, pathlib
        count = "--xla_force_host_platform_device_count"  # 8, and the suite's fast flags
        flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(count)]
        os.environ["XLA_FLAGS"] = " ".join([*flags, count + "=8"])
        sys.path.insert(0, {root!r})
        from tests import test_elastic as t

        marker = pathlib.Path({str(marker)!r})
        calls = []

        def measure(candidate):
            calls.append(candidate)
            if candidate.shape.num_devices > 4:  # the search on 8: its checkpoint is on disk
                marker.write_text("searching")
                time.sleep(600)
            return t.prefer_more_devices(candidate)

        schedule = t.Schedule({{0: 4, 4: 8}})
        trainer = t.elastic(pathlib.Path({str(tmp_path)!r}), t.resources.Callback(schedule),
                            switching=t.SwitchPolicy(check_every=5, measure=measure),
                            checkpoints=t.CheckpointPolicy(max_to_keep=2))
        t.run(trainer, schedule, 10)
    """))
    child = subprocess.Popen([sys.executable, str(script)], cwd=root,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 240
        while not marker.exists():
            assert child.poll() is None, child.stdout.read().decode()[-3000:]
            assert time.time() < deadline, "child never reached its search"
            time.sleep(0.2)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    # Resume on 6 devices (the child had 8): init restores the pre-search checkpoint.
    schedule = Schedule({0: 6})
    resumed = elastic(tmp_path, resources.Callback(schedule),
                      switching=SwitchPolicy(check_every=5, measure=prefer_more_devices),
                      checkpoints=CheckpointPolicy(max_to_keep=2))
    state = resumed.init(BATCHES[0])
    assert int(state.step) == 5
    assert events(resumed, "resume")[0]["checkpoint_step"] == 5
    state, losses = run(resumed, schedule, 10, first=5, state=state)
    np.testing.assert_allclose(losses, fixed_mesh_run(10)[0][5:], rtol=1e-5)
    assert resumed.shape.num_devices <= 6 and os.path.isdir(tmp_path / "run" / "state")


def test_steps_never_wait_on_the_device_and_losses_are_fetched_per_window(tmp_path,
                                                                         monkeypatch):
    """No device value is read on the host inside `step` (float(loss), int(state.step)
    and np.asarray all read `ArrayImpl._value`), except once per timing window; the
    losses arrive with their window and equal a fixed mesh's."""
    from jax._src.array import ArrayImpl

    reads = []
    value = ArrayImpl._value
    monkeypatch.setattr(ArrayImpl, "_value", property(
        lambda self: reads.append(1) or value.fget(self)))
    schedule = Schedule({0: 4})
    trainer = elastic(tmp_path, resources.Callback(schedule), timing=Timing(window=4),
                      switching=SwitchPolicy(check_every=100, measure=prefer_more_devices))
    state = trainer.init(BATCHES[0])
    losses, reading_steps = [], []
    for i in range(10):
        before = len(reads)
        state, metrics = trainer.step(state, BATCHES[i])
        if len(reads) > before:
            reading_steps.append(metrics["step"])
        assert isinstance(metrics["loss"], jax.Array) and metrics["step"] == i + 1
        losses.append(metrics["loss"])
    assert reading_steps == [4, 8]  # the ends of the two closed windows, nothing else
    assert [r.step for r in trainer.step_log.records] == list(range(1, 9))
    monkeypatch.undo()
    np.testing.assert_allclose(losses, fixed_mesh_run(10)[0], rtol=1e-5)
    records = trainer.steps  # reading them records the open window too
    assert [r.step for r in records] == list(range(1, 11))
    np.testing.assert_allclose([r.loss for r in records], fixed_mesh_run(10)[0], rtol=1e-5)
    assert all(r.seconds > 0 and r.samples_per_second > 0 for r in records)
    trainer.close()


def test_baseline_comes_from_clean_timing_windows_only(tmp_path):
    schedule = Schedule({0: 4})
    trainer = elastic(tmp_path, resources.Callback(schedule), timing=Timing(window=3),
                      switching=SwitchPolicy(check_every=100, measure=prefer_more_devices),
                      checkpoints=CheckpointPolicy(every=8))
    state = trainer.init(BATCHES[0])
    for i in range(6):  # window 1 holds the warm-up steps: not counted; window 2 is
        state, _ = trainer.step(state, BATCHES[i])
    assert trainer.baseline() is None and len(trainer.step_log.recent) == 1
    for i in range(6, 9):  # window 3 holds the periodic save at step 8: not counted
        state, _ = trainer.step(state, BATCHES[i])
    assert len(trainer.step_log.recent) == 1
    trainer.checkpointer.wait()  # no write beside the next window
    for i in range(9, 12):
        state, _ = trainer.step(state, BATCHES[i])
    baseline = trainer.baseline()
    assert baseline.source == "steps" and baseline.shape == trainer.shape
    assert baseline.samples_per_second == pytest.approx(
        BATCH / np.median(list(trainer.step_log.recent)))
    trainer.close()


def test_periodic_checkpoints_overlap_training_and_close_waits_for_them(tmp_path, monkeypatch):
    from meshscale.store.checkpoint import Checkpointer

    waits = []
    original = Checkpointer.wait
    monkeypatch.setattr(Checkpointer, "wait", lambda self: waits.append(1) or original(self))
    schedule = Schedule({0: 4, 8: 8})
    trainer = elastic(tmp_path, resources.Callback(schedule),
                      switching=SwitchPolicy(check_every=5, measure=prefer_more_devices),
                      checkpoints=CheckpointPolicy(every=2))
    state = trainer.init(BATCHES[0])
    waits.clear()
    for i in range(9):  # saves at 2, 4, 6, 8 (and before the search at 10): no wait yet
        state, _ = trainer.step(state, BATCHES[i])
    assert waits == [] and [e["checkpoint_step"] for e in events(trainer, "checkpoint")] \
        == [2, 4, 6, 8]
    schedule.step = 9
    state, _ = trainer.step(state, BATCHES[9])  # step 10: devices changed, search
    assert waits, "the checkpoint before a search must be on disk before the search"
    search_at = trainer.history.index(events(trainer, "search")[-1])
    assert [e["event"] for e in trainer.history[:search_at]].count("checkpoint") == 5
    waits.clear()
    state, _ = trainer.step(state, BATCHES[10])
    state, _ = trainer.step(state, BATCHES[11])  # periodic save at 12, in the background
    assert waits == []
    with trainer:  # close(): the last save is on disk
        pass
    assert waits
    restored = Checkpointer(tmp_path / "run" / "state", trainer.trainer).restore(
        trainer.shape, devices=trainer.devices)
    assert int(restored.step) == 12
    assert_trees_close(jax.device_get(restored.params), jax.device_get(state.params), 0.0)


def test_history_is_bounded_and_totals_count_the_whole_run(tmp_path):
    from meshscale.app.report import run_data, summary

    schedule = Schedule({0: 4, 6: 8})
    trainer = elastic(tmp_path, resources.Callback(schedule),
                      timing=Timing(window=2, history_limit=4),
                      switching=SwitchPolicy(check_every=5, measure=prefer_more_devices),
                      checkpoints=CheckpointPolicy(every=3))
    run(trainer, schedule, 13)
    assert len(trainer.history) == 4 and len(trainer.steps) == 4
    assert [r.step for r in trainer.steps] == [10, 11, 12, 13]
    totals = trainer.totals
    assert totals.steps == 13 and totals.switches == 2 and totals.searches == 2
    assert totals.checkpoints == 5  # 3, 6, 9, 12 and before the search at 10
    assert sum(totals.steps_per_mesh.values()) == 13 and len(totals.steps_per_mesh) == 2
    per_mesh = summary(run_data(trainer))["per_mesh"]
    assert {m: v["steps"] for m, v in per_mesh.items()} == totals.steps_per_mesh
    trainer.close()


def test_old_keyword_form_still_works_with_a_deprecation_warning(tmp_path):
    """The one call of the keyword form of meshscale 0.1 kept on purpose: it warns, builds
    the same options and trains the same run (same losses, same switches) as the new form;
    mixing the two forms is refused."""
    measure = prefer_more_devices
    schedules = {"new": Schedule({0: 4, 4: 8}), "old": Schedule({0: 4, 4: 8})}
    new = elastic(tmp_path / "new", resources.Callback(schedules["new"]),
                  space=SearchSpace(p_min=2, max_pipe=4), timing=Timing(warmup=1, window=2),
                  switching=SwitchPolicy(check_every=5, via="memory", measure=measure),
                  checkpoints=CheckpointPolicy(every=4))
    with pytest.warns(DeprecationWarning, match="deprecated"):
        old = ElasticTrainer(make_model("mlp"), OPTIMIZER, global_batch=BATCH,
                             checkpoint_dir=tmp_path / "old" / "run", p_min=2,
                             resources=resources.Callback(schedules["old"]),
                             compile_cache=CACHE, persistent_cache=False, check_every=5,
                             switch_via="memory", timing_window=2, checkpoint_every=4,
                             search_options={"measure": measure, "max_pipe": 4, "warmup": 1})
    OPEN.append(old)
    assert (old.space, old.timing, old.switching, old.checkpoints) \
        == (new.space, new.timing, new.switching, new.checkpoints)
    assert old.trainer.cache is CACHE and not old.trainer.skip_nonfinite
    losses = {}
    for form, trainer in (("new", new), ("old", old)):
        _, losses[form] = run(trainer, schedules[form], 10)
    np.testing.assert_array_equal(np.asarray(losses["old"]), np.asarray(losses["new"]))
    np.testing.assert_allclose(np.asarray(losses["new"]), fixed_mesh_run(10)[0], rtol=1e-5)
    switches = {form: [(e["step"], e["before"], e["after"], e["num_devices"], e["reason"])
                       for e in events(trainer, "switch")]
                for form, trainer in (("new", new), ("old", old))}
    assert switches["old"] == switches["new"]
    assert [s[3] for s in switches["new"]] == [4, 8]  # the start and a switch at the change
    with pytest.raises((TypeError, InvalidArgument)):  # a Trainer with an old keyword
        ElasticTrainer(Trainer(make_model("mlp"), OPTIMIZER, global_batch=BATCH, cache=CACHE),
                       checkpoint_dir=tmp_path / "mixed", resources=4, p_min=2)
    with pytest.raises((TypeError, InvalidArgument)):  # the old form with an option object
        ElasticTrainer(make_model("mlp"), OPTIMIZER, global_batch=BATCH,
                       checkpoint_dir=tmp_path / "mixed", resources=4, p_min=2,
                       space=SearchSpace(p_min=2))
