"""Real try-runs and searches on simulated CPU devices (few compiles: they are slow here)."""

import types

import jax
import numpy as np
import optax
import pytest
from flax import nnx
from meshscale.models.gpt import GPT, GPTConfig
from meshscale.models.mlp import MLPConfig, ResidualMLP

from meshscale import (
    Candidate,
    InsufficientDevices,
    MeshShape,
    SearchSpace,
    Timing,
    Trainer,
    search,
    try_run,
)
from meshscale.planning.memory import auto_p_min, bytes_per_device
from meshscale.planning.tryrun import LiveState

LIVE = MeshShape(2, 2, 2)


def snapshot(state):
    return [np.array(x) for x in jax.tree.leaves(state)]


def assert_unchanged(state, before):
    leaves = jax.tree.leaves(state)
    assert not any(x.is_deleted() for x in leaves)
    assert all(np.array_equal(np.array(x), b) for x, b in zip(leaves, before, strict=True))


@pytest.fixture(scope="module")
def mlp(devices):
    model = ResidualMLP(MLPConfig(num_layers=4, features=8, hidden=16), rngs=nnx.Rngs(0))
    trainer = Trainer(model, optax.adam(1e-2), global_batch=8)
    batches = [jax.device_get(model.example_batch(8, seed=s)) for s in range(3)]
    state = trainer.init_state(LIVE, devices[:4])
    return trainer, batches, state


def test_try_run_measures_and_leaves_live_state_unchanged(mlp, devices):
    trainer, batches, state = mlp
    before = snapshot(state)
    # the live state's own shape: placement aliases it, only the copy protects it (the
    # GPT search below covers placing onto another mesh)
    r = try_run(trainer, state, batches, Candidate(LIVE, "current"), devices[:4],
                timing=Timing(warmup=1, steps=3))
    assert_unchanged(state, before)
    assert r.ok, r.status
    assert r.compile_origin == "on-demand" and r.compile_seconds > 0
    assert r.samples_per_second == pytest.approx(8 / r.step_seconds)
    assert r.samples_per_second_per_device == pytest.approx(r.samples_per_second / 4)
    assert 0 < r.tryrun_samples_per_second < r.samples_per_second
    assert r.step_spread >= 0 and r.bytes_per_device > 0 and r.num_devices == 4
    again = try_run(trainer, state, batches, Candidate(LIVE, "current"), devices[:4],
                    timing=Timing(warmup=0, steps=1))
    assert again.ok and again.compile_origin == "hit"
    assert_unchanged(state, before)


def test_over_budget_and_invalid_candidates_are_skipped_with_reason(mlp, devices):
    trainer, batches, state = mlp
    over = try_run(trainer, state, batches, Candidate(LIVE, "current"), devices[:4],
                   memory_budget=1024)
    assert over.status.startswith("skipped: would need ") and "budget 1.00 KiB" in over.status
    assert over.bytes_per_device > 1024 and not over.ok
    bad = try_run(trainer, state, batches, Candidate(MeshShape(2, 1, 1, 2), "vertical"),
                  devices[:4])
    assert bad.status.startswith("skipped: repeats=2 needs microbatches >= pipe=2")


def test_failing_candidate_is_recorded_not_raised(mlp, devices):
    trainer, batches, state = mlp
    before = snapshot(state)
    wrong = [{"x": np.zeros((8, 3), np.float32), "y": np.zeros((8, 4), np.float32)}]
    r = try_run(trainer, state, wrong, Candidate(LIVE, "current"), devices[:4])
    assert r.status.startswith("failed: ") and "Argument types differ" in r.status
    assert not r.ok
    # it got as far as the step: the compile itself went through (fresh or from the cache,
    # depending on which xdist worker ran the tests above)
    assert r.compile_origin in ("hit", "on-demand")
    assert_unchanged(state, before)


class _Compiled:
    def __init__(self, temp):
        self.temp = temp

    def memory_analysis(self):
        return types.SimpleNamespace(argument_size_in_bytes=100, output_size_in_bytes=100,
                                     alias_size_in_bytes=100, temp_size_in_bytes=self.temp,
                                     generated_code_size_in_bytes=0)


class _MemoryTrainer:
    """Needs 1000 / pipe + 100 bytes per device; 6 layers (pipe 7 and 8 are invalid)."""

    num_layers, global_batch = 6, 12

    def __init__(self):
        self.compiled = []

    def check(self, shape, devices):
        Trainer.check(self, shape, devices)

    def compile_step(self, shape, devices):
        self.compiled.append(shape)
        return _Compiled(1000 // shape.pipe)


def test_auto_p_min_is_the_smallest_pipe_that_fits(devices):
    t = _MemoryTrainer()
    assert auto_p_min(t, devices, budget=600) == 2  # 1100 > 600 >= 600
    assert [s.pipe for s in t.compiled] == [1, 2]
    assert auto_p_min(t, devices, budget=300) == 5  # 1000 // 4 + 100 > 300 >= 1000 // 5 + 100
    assert [s.pipe for s in t.compiled] == [1, 2, 1, 2, 3, 4, 5]  # uneven widths count too
    with pytest.raises(InsufficientDevices, match="no pipe width up to 8 fits"):
        auto_p_min(t, devices, budget=200)
    with pytest.raises(InsufficientDevices, match="up to 2 fits"):
        auto_p_min(t, devices[:2], budget=300)


def test_gpt_search_runs_every_candidate_and_second_search_compiles_nothing(devices):
    cfg = GPTConfig(num_layers=4, d_model=32, num_heads=4, seq_len=16)
    model = GPT(cfg, rngs=nnx.Rngs(0))
    trainer = Trainer(model, optax.adam(1e-3), global_batch=16)
    batches = [jax.device_get(model.example_batch(16, seed=s)) for s in range(2)]
    state = trainer.init_state(MeshShape(2, 4, 2), devices)  # the live state, at start-up
    before = snapshot(state)

    first = search(trainer, state, batches, devices, space=SearchSpace(p_min=2),
                    timing=Timing(warmup=1, steps=2))
    compiles = trainer.cache.compiles
    second = search(trainer, state, batches, devices, space=SearchSpace(p_min=2),
                    timing=Timing(warmup=1, steps=2))

    assert [(str(r.shape), r.kind) for r in first.results] == [
        ("2x4/m4", "horizontal"), ("3x2/m8", "horizontal"), ("4x2/m8", "horizontal")]
    assert all(r.ok or r.status.startswith("skipped: ") for r in first.results)
    assert compiles == 3 and trainer.cache.compiles == compiles  # nothing compiled again
    assert [r.compile_origin for r in first.results] == ["on-demand"] * 3
    assert [r.compile_origin for r in second.results] == ["hit"] * 3
    assert sum(r.compile_seconds for r in second.results) < 0.1 * sum(
        r.compile_seconds for r in first.results)
    for d in (first, second):
        ran = [r for r in d.results if r.ok]
        assert d.best.samples_per_second == max(r.samples_per_second for r in ran)
        assert d.switch and d.target == d.best.shape  # start-up: run the best
        assert d.max_useful_devices in {r.num_devices for r in ran}
    tight = search(trainer, state, batches, devices,
                   space=SearchSpace(p_min=2, memory_budget="1KiB"))
    assert all(r.status.startswith("skipped: would need") for r in tight.results)
    assert tight.best is None and not tight.switch and trainer.cache.compiles == compiles
    assert_unchanged(state, before)


def test_candidate_fitting_only_without_the_live_state_releases_it(mlp, devices):
    trainer, batches, _ = mlp
    state = trainer.init_state(LIVE, devices[:4])  # its own: this test releases it
    need = trainer.compile_step(LIVE, devices[:4])
    live_bytes = LiveState(state).bytes_on(devices[:4])
    assert live_bytes == trainer.state_bytes_per_device(LIVE)
    budget = bytes_per_device(need) + live_bytes // 2  # fits alone, not beside
    before = snapshot(state)
    kept = try_run(trainer, state, batches, Candidate(LIVE, "current"), devices[:4],
                   timing=Timing(warmup=0, steps=1), memory_budget=budget)
    assert kept.status.endswith("with the live state beside it"), kept.status
    assert_unchanged(state, before)
    restored = []
    live = LiveState(state, restore=lambda shape, devs: restored.append(shape))
    result = try_run(trainer, live, batches, Candidate(LIVE, "current"), devices[:4],
                     timing=Timing(warmup=0, steps=1), memory_budget=budget)
    assert result.ok, result.status
    assert live.released and all(x.is_deleted() for x in jax.tree.leaves(state))
    elsewhere = try_run(trainer, live, batches, Candidate(MeshShape(2, 2, 2), "current"),
                        devices[4:], timing=Timing(warmup=0, steps=1), memory_budget=budget)
    assert elsewhere.ok and restored == []  # the owner restores, after its decision
