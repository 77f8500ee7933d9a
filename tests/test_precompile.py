"""Compiled candidates ready before the change: counted from the cache record, not time."""

import collections
import json
import pathlib
import subprocess
import sys
import textwrap

import jax
import numpy as np
import optax
import pytest

from meshscale import (
    CheckpointPolicy,
    CompileCache,
    MeshscaleError,
    SearchSpace,
    SwitchPolicy,
    Timing,
    Trainer,
)
from meshscale.elastic import resources
from meshscale.elastic.trainer import ElasticTrainer
from meshscale.planning.precompile import Precompiler, devices_for, likely_next_counts, resolve_mode
from tests.helpers import make_model
from tests.test_elastic import BATCH, BATCHES, Schedule, fixed_mesh_run, prefer_more_devices, run


def test_lru_cache_keeps_its_bound_and_records_hits_misses_evictions():
    cache = CompileCache(maxsize=2)
    made = []
    get = lambda key: cache.get(key, lambda: made.append(key) or key.upper())
    assert get("a") == "A" and get("b") == "B" and get("a") == "A"
    get("c")  # evicts b, the least recently used
    assert "b" not in cache and "a" in cache and "c" in cache and len(cache) == 2
    get("b")
    assert made == ["a", "b", "c", "b"]
    stats = cache.stats()
    assert (stats["hits"], stats["misses"], stats["evictions"]) == (1, 4, 2)
    with pytest.raises(ValueError):
        CompileCache(maxsize=0)


def test_likely_next_counts_prefer_announced_and_stay_in_range():
    assert likely_next_counts(4, p_min=2, max_devices=8) == [3, 5]
    assert likely_next_counts(8, p_min=2, max_devices=8) == [7]
    assert likely_next_counts(2, p_min=2, max_devices=8) == [3]
    assert likely_next_counts(4, p_min=2, max_devices=8, announced=[8, 4, 1, 6]) == [8, 6]
    devs = jax.devices()
    assert devices_for(3, devs[:4]) == devs[:3]
    assert devices_for(6, devs[2:6]) == devs[2:6] + devs[:2]
    assert resolve_mode("auto") == "off"  # CPU: the compiler would compete with the step
    assert resolve_mode([8, 6]) == [8, 6]
    with pytest.raises(MeshscaleError):
        resolve_mode("sometimes")


def test_after_precompiling_a_device_change_compiles_nothing_on_the_critical_path(tmp_path):
    cache = CompileCache()
    schedule = Schedule({0: 4, 4: 8})
    trainer = ElasticTrainer(
        Trainer(make_model("mlp"), optax.adam(1e-2), global_batch=BATCH, cache=cache),
        checkpoint_dir=tmp_path, resources=resources.Callback(schedule, announced=lambda: [8]),
        space=SearchSpace(p_min=2, max_pipe=4), timing=Timing(warmup=1, steps=1),
        switching=SwitchPolicy(check_every=5, precompile="on"),
        checkpoints=CheckpointPolicy(persistent_cache=False))
    state = trainer.init(BATCHES[0])
    assert trainer.precompiler.wait(timeout=600)
    background = [r for r in trainer.precompiler.records if r.num_devices == 8]
    assert background and all(r.status == "compiled" for r in background)
    on_demand = cache.count("miss", "on-demand")
    state, losses = run(trainer, schedule, 10, state=state)
    assert cache.count("miss", "on-demand") == on_demand  # zero compiles after the change
    search = [e for e in trainer.history if e["event"] == "search"][-1]
    assert search["num_devices"] == 8
    assert {r.compile_origin for r in search["decision"].results} <= {"background", "hit"}
    np.testing.assert_allclose(losses, fixed_mesh_run(10)[0], rtol=1e-5)
    trainer.close()  # no background compile outlives the test


def test_a_failing_precompile_is_recorded_and_never_breaks_training(tmp_path, monkeypatch):
    model = make_model("mlp")
    trainer = ElasticTrainer(
        Trainer(model, optax.adam(1e-2), global_batch=BATCH), checkpoint_dir=tmp_path,
        resources=resources.Static(4), space=SearchSpace(p_min=2, max_pipe=2),
        timing=Timing(warmup=1, steps=1), switching=SwitchPolicy(check_every=5, precompile=[3]),
        checkpoints=CheckpointPolicy(persistent_cache=False))
    real = trainer.trainer.compile_step

    def compile_step(shape, devices=None, *, origin="on-demand"):
        if origin == "background":
            raise RuntimeError("RESOURCE_EXHAUSTED: would not fit")
        return real(shape, devices, origin=origin)

    monkeypatch.setattr(trainer.trainer, "compile_step", compile_step)
    state = trainer.init(BATCHES[0])
    assert trainer.precompiler.wait(timeout=600)
    assert trainer.precompiler.records
    assert all(r.status.startswith("failed: RuntimeError") for r in trainer.precompiler.records)
    state, losses = run(trainer, Schedule({0: 4}), 3, state=state)
    assert all(np.isfinite(losses))
    trainer.close()


def test_a_restarted_process_loads_its_executables_from_the_persistent_cache(tmp_path):
    root = str(pathlib.Path(__file__).resolve().parents[1])
    script = tmp_path / "compile.py"
    script.write_text(textwrap.dedent(f"""
        import json, os, sys
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
        sys.path.insert(0, {root!r})
        import optax
        from meshscale import MeshShape, Trainer, enable_persistent_cache
        from meshscale.training.compile_cache import persistent_cache_stats
        from tests.helpers import make_model
        trainer = Trainer(make_model("mlp"), optax.adam(1e-2), global_batch=24)
        enable_persistent_cache({str(tmp_path / "jax_cache")!r})
        before = persistent_cache_stats()
        trainer.compile_step(MeshShape(2, 2, 2))
        after = persistent_cache_stats()
        print(json.dumps({{k: after[k] - before[k] for k in after}}))
    """))
    runs = [subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                           timeout=300, cwd=root) for _ in range(2)]
    for r in runs:
        assert r.returncode == 0, r.stderr[-2000:]
    first, second = (json.loads(r.stdout.strip().splitlines()[-1]) for r in runs)
    assert first["misses"] >= 1 and first["hits"] == 0
    assert second["misses"] == 0 and second["hits"] == first["misses"]


def test_precompiler_skips_what_is_already_cached():
    model = make_model("mlp")
    from meshscale import Trainer

    trainer = Trainer(model, optax.adam(1e-2), global_batch=BATCH)
    pre = Precompiler(trainer, space=SearchSpace(p_min=2, max_pipe=2, microbatches=[2]))
    devices = jax.devices()[:2]
    assert pre.plan([2], devices, current=None) == 1
    assert pre.wait(timeout=600)
    assert pre.plan([2], devices, current=None) == 0  # compiled: nothing to queue
    assert [r.status for r in pre.records] == ["compiled"]
    pre.close()


def test_paused_precompiler_compiles_nothing_until_resumed():
    trainer = Trainer(make_model("mlp"), optax.adam(1e-3), global_batch=BATCH,
                      cache=CompileCache())
    pre = Precompiler(trainer, space=SearchSpace(p_min=2, max_pipe=2, microbatches=[2]))
    with pre.paused():
        activity = pre.activity
        assert pre.plan([2], jax.devices()[:2], current=None) == 1
        assert not pre.wait(timeout=1.0)  # queued, not compiled: the gate is held
        assert pre.records == collections.deque() and pre.quiet_since(activity)
    assert pre.wait(timeout=120)
    assert [r.status for r in pre.records] == ["compiled"] and not pre.quiet_since(activity)
    pre.close()


def test_the_search_runs_with_the_precompiler_paused(tmp_path):
    gate_held = []

    def measure(candidate):
        gate_held.append(trainer.precompiler._gate.locked())
        return prefer_more_devices(candidate)

    schedule = Schedule({0: 4})
    trainer = ElasticTrainer(Trainer(make_model("mlp"), optax.adam(1e-3), global_batch=BATCH),
                             checkpoint_dir=tmp_path, resources=resources.Callback(schedule),
                             space=SearchSpace(p_min=2),
                             switching=SwitchPolicy(precompile=[3], measure=measure),
                             checkpoints=CheckpointPolicy(persistent_cache=False))
    trainer.init(BATCHES[0])
    assert gate_held and all(gate_held)
    trainer.close()
