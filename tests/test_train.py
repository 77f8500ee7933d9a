"""Placement, fresh state, and the errors of the core API."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from meshscale.models.mlp import MLPConfig, ResidualMLP

from meshscale import (
    ContractError,
    InsufficientDevices,
    InvalidArgument,
    InvalidMeshShape,
    LayerStack,
    MeshShape,
    Trainer,
    TrainState,
    make_mesh,
    stack_layers,
)
from tests.helpers import GLOBAL_BATCH, assert_trees_equal, make_model, make_optimizer

# Even splits, uneven ones (8 layers stored as 9 and 14 padded rows), and a circular one.
SHAPES = [MeshShape(p, d, 1) for p, d in [(1, 1), (1, 8), (2, 4), (4, 2), (8, 1), (3, 2), (7, 1)]]
SHAPES.append(MeshShape(2, 2, 2, repeats=2))


@pytest.fixture(scope="module")
def trainer():
    """The test MLP with hidden = features: its up and down projections share one shape,
    so moving states between meshes compiles a third fewer slices (sizes decide nothing
    here; the 8 layers, split evenly, unevenly and circularly, are what matters)."""
    cfg = MLPConfig(num_layers=8, features=16, hidden=16)
    return Trainer(ResidualMLP(cfg, rngs=nnx.Rngs(0)), make_optimizer(), global_batch=GLOBAL_BATCH)


def perturbed_state(trainer, shape):
    """A state that is not the initial one (so a move that resets values would show); the
    stack's padding rows stay zero."""
    state = trainer.init_state(shape)
    params = jax.tree.map(lambda x: x + jnp.ones_like(x) * 0.125, trainer.model_params(
        state.params))
    return trainer.place(TrainState(state.step + 1, params, state.opt_state), shape)


def layer_state(trainer, state):
    """`state` on the host without its padding (comparable across meshes)."""
    return trainer.unpadded_state(jax.device_get(state))


def test_init_state_is_the_same_start_on_every_mesh(trainer):
    states = [layer_state(trainer, trainer.init_state(s)) for s in SHAPES]
    for state in states[1:]:
        assert_trees_equal(state, states[0])
    assert_trees_equal(states[0].params, trainer.initial_params)
    for leaf in jax.tree.leaves(trainer.init_state(MeshShape(2, 4))):
        assert isinstance(leaf.sharding, jax.sharding.NamedSharding)


def test_place_between_every_pair_of_shapes_is_bit_identical(trainer):
    states = {s: perturbed_state(trainer, s) for s in SHAPES}
    expected = jax.device_get(states[SHAPES[0]])
    for src, dst in itertools.permutations(SHAPES, 2):
        moved = trainer.place(states[src], dst)
        assert_trees_equal(layer_state(trainer, moved), expected)
        want = trainer.shardings(dst)
        for leaf, sharding in zip(jax.tree.leaves(moved), jax.tree.leaves(want), strict=True):
            assert leaf.sharding == sharding, f"{src} -> {dst}"


def test_training_after_place_keeps_the_losses(trainer):
    batches = [make_model("mlp").example_batch(GLOBAL_BATCH, seed=i) for i in range(4)]
    a, b = MeshShape(2, 4, 2), MeshShape(4, 2, 2)

    def run(shapes):
        state, losses = trainer.init_state(shapes[0]), []
        for shape, batch in zip(shapes, batches, strict=True):
            state = trainer.place(state, shape)
            state, metrics = trainer.compile_step(shape)(state, trainer.put_batch(batch, shape))
            losses.append(float(metrics["loss"]))
        return losses, jax.device_get(state.params)

    fixed_losses, fixed_params = run([a, a, a, a])
    moved_losses, moved_params = run([a, a, b, b])
    np.testing.assert_allclose(moved_losses, fixed_losses, rtol=1e-6)
    np.testing.assert_allclose(
        jax.tree.leaves(moved_params)[0], jax.tree.leaves(fixed_params)[0], rtol=1e-5, atol=1e-6)
    assert trainer.cache.count("hit") >= 4  # the same executables were reused


def test_compile_step_is_cached_per_shape_and_devices(trainer):
    shape = MeshShape(2, 1, 2)
    first = trainer.compile_step(shape)
    assert trainer.compile_step(shape) is first
    other_devices = jax.devices()[4:]
    assert trainer.compile_step(shape, other_devices) is not first


def test_models_with_equal_shapes_and_different_forwards_get_their_own_executables():
    """GPTs with 2 and 4 heads have the same parameter shapes; sharing a cache, each must
    run its own forward (its loss equals its own plain reference), and a new optimizer
    object never reuses another's entry."""
    import dataclasses

    from meshscale.models.gpt import GPT

    from meshscale import CompileCache
    from tests.helpers import SIMPLE_TOL, TEST_GPT

    cache, shape, losses, optimizer = CompileCache(), MeshShape(1, 1, 1), {}, make_optimizer()
    for heads in (2, 4):
        model = GPT(dataclasses.replace(TEST_GPT, num_heads=heads, num_layers=2),
                    rngs=nnx.Rngs(0))
        trainer = Trainer(model, optimizer, global_batch=4, cache=cache)
        batch = model.example_batch(4)
        reference = float(trainer.fmodel.loss(trainer.initial_params, batch))
        _, metrics = trainer.compile_step(shape)(trainer.init_state(shape),
                                                 trainer.put_batch(batch, shape))
        np.testing.assert_allclose(float(metrics["loss"]), reference, rtol=SIMPLE_TOL)
        losses[heads] = reference
    assert losses[2] != losses[4]  # the forwards differ, so sharing would have shown
    assert cache.count("miss") == 2 and cache.count("hit") == 0
    again = Trainer(model, make_optimizer(), global_batch=4, cache=cache)
    again.compile_step(shape)  # same forward, another optimizer object: its own entry
    assert cache.count("miss") == 3


# -- errors -------------------------------------------------------------------------
def test_schedules_that_cannot_hold_the_layers_are_refused():
    four = Trainer(ResidualMLP(MLPConfig(num_layers=4, features=8, hidden=8),
                               rngs=nnx.Rngs(0)), make_optimizer(), global_batch=GLOBAL_BATCH)
    with pytest.raises(InvalidMeshShape, match="pipe=5 exceeds num_layers=4: more stages"):
        four.init_state(MeshShape(5, 1))
    with pytest.raises(InvalidMeshShape, match="pipe \\* repeats = 2 \\* 4 exceeds num_layers=4"):
        four.check(MeshShape(2, 1, 4, repeats=4))
    with pytest.raises(InvalidMeshShape, match="repeats=2 needs microbatches >= pipe=2"):
        four.check(MeshShape(2, 1, 1, repeats=2))
    with pytest.raises(InvalidMeshShape, match="repeats=2 needs pipe > 1"):
        four.check(MeshShape(1, 2, 2, repeats=2))


def test_batch_not_divisible_by_data_times_microbatches_is_refused(trainer):
    with pytest.raises(InvalidMeshShape, match="not divisible by data \\* microbatches"):
        trainer.compile_step(MeshShape(1, 8, 8))


def test_more_devices_than_exist_is_refused(trainer):
    with pytest.raises(InsufficientDevices, match="needs 16 devices, only 8 available"):
        trainer.init_state(MeshShape(2, 8))
    with pytest.raises(InsufficientDevices, match="needs 4 devices"):
        make_mesh(MeshShape(2, 2), jax.devices()[:3])


def test_bad_mesh_shapes_are_refused():
    with pytest.raises(InvalidMeshShape, match="pipe must be a positive int"):
        MeshShape(0, 1)
    with pytest.raises(InvalidMeshShape, match="cannot parse"):
        MeshShape.parse("2by4")
    assert MeshShape.parse("2x4/m8") == MeshShape(2, 4, 8)
    assert MeshShape.parse(str(MeshShape(4, 2, 3))) == MeshShape(4, 2, 3)


def test_batch_with_wrong_leading_axis_is_refused():
    model = make_model("mlp")
    with pytest.raises(ContractError, match="leading axis global_batch=16"):
        Trainer(model, make_optimizer(), global_batch=16,
                example_batch=model.example_batch(GLOBAL_BATCH))


class NoBlocks(nnx.Module):
    num_layers = 2

    def embed(self, batch):
        return batch

    def head_loss(self, h, batch):
        return h.mean()

    def loss(self, batch):
        return batch.mean()


class UnstackedBlocks(LayerStack):
    def __init__(self):
        self.num_layers = 4
        self.blocks = nnx.Linear(3, 3, rngs=nnx.Rngs(0))  # one layer, not a stack

    def embed(self, batch):
        return batch["x"]

    def head_loss(self, h, batch):
        return h.mean()


class WithBatchStats(LayerStack):
    def __init__(self):
        self.num_layers = 2
        self.blocks = stack_layers(lambda r: nnx.Linear(3, 3, rngs=r), 2, nnx.Rngs(0))
        self.norm = nnx.BatchNorm(3, rngs=nnx.Rngs(1))

    def embed(self, batch):
        return batch["x"]

    def head_loss(self, h, batch):
        return self.norm(h).mean()


@pytest.mark.parametrize("model,message", [
    (object(), "is not a flax.nnx.Module"),
    (NoBlocks(), "blocks must be an nnx.Module built with meshscale.stack_layers"),
    (UnstackedBlocks(), "expected a leading layer axis of 4"),
    (WithBatchStats(), "holds non-Param state"),
])
def test_models_breaking_the_contract_are_refused(model, message):
    with pytest.raises(ContractError, match=message):
        Trainer(model, optax.sgd(0.1), global_batch=4, example_batch={"x": np.zeros((4, 3))})


def test_layout_is_computed_once_per_mesh_and_read_by_every_placement_question(devices):
    trainer = Trainer(make_model("mlp"), make_optimizer(), global_batch=8)
    shape = MeshShape(2, 2, 2)
    layout = trainer.layout(shape, devices[:4])
    assert trainer.layout(shape, devices[:4]) is layout  # cached
    assert trainer.layout(shape, devices[4:]) is not layout  # other devices, other mesh
    assert trainer.shardings(shape, devices[:4]) is layout.shardings
    assert trainer.targets(shape, devices[:4]) is layout.targets
    assert trainer.abstract_state(shape) is layout.abstract
    assert trainer.specs(shape) is layout.specs
    rows = jax.tree.leaves(trainer.batch_sharding(shape, devices[:4]))
    assert rows and all(s is layout.rows for s in rows)
    # the targets carry the stored (padded) shapes with their shardings
    for target, abstract, sharding in zip(jax.tree.leaves(layout.targets),
                                          jax.tree.leaves(layout.abstract),
                                          jax.tree.leaves(layout.shardings), strict=True):
        assert target.shape == abstract.shape and target.sharding == sharding


def test_timing_is_checked_and_the_timer_never_times_warmup():
    from meshscale import Timing
    from meshscale.training.timing import WARMUP_STEPS, time_steps

    assert Timing().warmup == WARMUP_STEPS
    with pytest.raises(InvalidArgument, match="Timing.window must be a positive int"):
        Timing(window=0)
    calls = []
    times = time_steps(lambda i: calls.append(i) or jnp.zeros(()), warmup=2, steps=3)
    assert calls == [0, 1, 2, 3, 4] and len(times) == 3 and all(t >= 0 for t in times)
