"""Every mesh shape computes the one-device reference's loss, gradients and updates."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P
from meshscale.models.gpt import GPT

from meshscale import (
    InvalidArgument,
    InvalidMeshShape,
    LayerStack,
    MeshShape,
    Trainer,
    stack_layers,
)
from meshscale.layout import padding, sharding
from meshscale.layout.mesh import PIPE, make_mesh
from meshscale.layout.schedule import Schedule
from meshscale.layout.sharding import STATE_SHARDINGS
from meshscale.model import pipeline
from meshscale.model.contract import FunctionalModel
from tests.helpers import (
    DEEP_TOL,
    GLOBAL_BATCH,
    SIMPLE_TOL,
    TEST_GPT,
    assert_trees_close,
    make_model,
    make_optimizer,
)

SHAPES = [(1, 1), (1, 8), (2, 4), (4, 2), (8, 1), (2, 2), (4, 1), (2, 1)]
MODELS = ["mlp", "gpt"]
TOL = {"mlp": SIMPLE_TOL, "gpt": DEEP_TOL}
# Every shape at 2 microbatches, for both models; every microbatch count (none, fewer
# and more microbatches than stages, accumulation on one stage) on 1x1, 2x4 and 8x1 for
# the MLP and on 2x4 for the GPT (the same pipeline code, a compile about three times
# slower on CPU). The three-step test below covers every shape again, end to end.
SWEEP = {"mlp": [(1, 1), (2, 4), (8, 1)], "gpt": [(2, 4)]}
# State sharding changes the pipeline only through "fsdp" (stages gather their layers
# over data); "replicate" and "zero1" share one loss, so "replicate" stands for both there
# and the three-step tests (where the optimizer state's placement matters) run all three.
CASES = [
    (name, MeshShape(p, d, m), mode)
    for name in MODELS
    for p, d in SHAPES
    for m in (1, 2, 4)
    for mode in ("fsdp", "replicate")
    if GLOBAL_BATCH % (d * m) == 0 and (m == 2 or (p, d) in SWEEP[name])
    and (mode == "fsdp" or (name == "mlp" and m == 2))
]


@functools.cache
def setup(name, mode="fsdp"):
    model = make_model(name)
    trainer = Trainer(model, make_optimizer(), global_batch=GLOBAL_BATCH, state_sharding=mode)
    fmodel, params = FunctionalModel.of(model)
    batch = jax.device_get(model.example_batch(GLOBAL_BATCH, seed=1))
    return trainer, fmodel, params, batch


@functools.cache
def reference(name, steps=3):
    """Loss, gradients and `steps` optax updates on one device with plain `jax.jit`."""
    _, fmodel, params, batch = setup(name)
    grad_fn = jax.jit(jax.value_and_grad(fmodel.loss))
    optimizer = make_optimizer()

    @jax.jit
    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(fmodel.loss)(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    loss, grads = grad_fn(params, batch)
    trained, opt_state, losses = params, optimizer.init(params), []
    for _ in range(steps):
        trained, opt_state, step_loss = step(trained, opt_state, batch)
        losses.append(float(step_loss))
    return float(loss), jax.device_get(grads), jax.device_get(trained), losses


@pytest.mark.parametrize("name,shape,mode", CASES, ids=[f"{n}-{s}-{m}" for n, s, m in CASES])
def test_loss_and_gradients_match_one_device_reference(name, shape, mode):
    trainer, _, params, batch = setup(name, mode)
    ref_loss, ref_grads, _, _ = reference(name)
    loss, grads = jax.jit(jax.value_and_grad(trainer.loss_fn(shape)))(params, batch)
    np.testing.assert_allclose(float(loss), ref_loss, rtol=TOL[name])
    assert_trees_close(jax.device_get(grads), ref_grads, TOL[name], f"{name} {shape} grad")


STEP_CASES = [(name, MeshShape(p, d, 2), mode) for name in MODELS for p, d in SHAPES
              for mode in STATE_SHARDINGS
              if (name == "mlp" and (mode == "fsdp" or d > 1))
              or ((p, d), mode) in [((1, 8), "fsdp"), ((8, 1), "fsdp"), ((2, 4), "zero1")]]


@pytest.mark.parametrize("name,shape,mode", STEP_CASES,
                         ids=[f"{n}-{s}-{m}" for n, s, m in STEP_CASES])
def test_three_compiled_steps_match_three_reference_steps(name, shape, mode):
    trainer, _, _, batch = setup(name, mode)
    _, _, ref_params, ref_losses = reference(name)
    state = trainer.init_state(shape)
    step = trainer.compile_step(shape)
    losses = []
    for _ in range(3):
        state, metrics = step(state, trainer.put_batch(batch, shape))
        losses.append(float(metrics["loss"]))
    np.testing.assert_allclose(losses, ref_losses, rtol=TOL[name])
    assert int(state.step) == 3
    assert_trees_close(trainer.model_params(jax.device_get(state.params)), ref_params,
                       TOL[name], f"{name} {shape}")


@pytest.mark.parametrize("remat", ["none", "stage"])
def test_every_remat_policy_gives_the_same_gradients(remat):
    _, _, params, batch = setup("gpt")
    shape = MeshShape(2, 2, 2)
    default = Trainer(make_model("gpt"), make_optimizer(), global_batch=GLOBAL_BATCH)
    other = Trainer(make_model("gpt"), make_optimizer(), global_batch=GLOBAL_BATCH, remat=remat)
    assert default.remat == "layer"
    expected = jax.jit(jax.value_and_grad(default.loss_fn(shape)))(params, batch)
    actual = jax.jit(jax.value_and_grad(other.loss_fn(shape)))(params, batch)
    assert_trees_close(jax.device_get(actual), jax.device_get(expected), TOL["gpt"], remat)


def test_bad_remat_and_state_sharding_are_refused():
    with pytest.raises(InvalidArgument, match="remat must be one of none, layer, stage") as e:
        Trainer(make_model("mlp"), make_optimizer(), global_batch=GLOBAL_BATCH, remat="all")
    assert not isinstance(e.value, InvalidMeshShape)  # an argument, not a mesh
    with pytest.raises(InvalidArgument, match="state_sharding must be one of replicate"):
        Trainer(make_model("mlp"), make_optimizer(), global_batch=GLOBAL_BATCH,
                state_sharding="zero3")


# -- uneven stages and the circular schedule (meshscale.layout.schedule) ---------------------
# 3, 5, 6, 7 stages of 8 layers (uneven contiguous ranges), and circular shapes whose
# groups are even (2x2/r2, 4x2/r2) or not (8 layers in 6 groups: 2x4/r3, 3x2/r2).
UNEVEN = [MeshShape(3, 2, 4), MeshShape(5, 1, 8), MeshShape(6, 1, 8), MeshShape(7, 1, 8)]
CIRCULAR = [MeshShape(2, 2, 4, 2), MeshShape(4, 2, 4, 2), MeshShape(2, 4, 2, 3),
            MeshShape(3, 2, 4, 2)]
SCHEDULE_CASES = [(name, shape) for name in MODELS for shape in UNEVEN + CIRCULAR]


@pytest.mark.parametrize("name,shape", SCHEDULE_CASES,
                         ids=[f"{n}-{s}" for n, s in SCHEDULE_CASES])
def test_uneven_and_circular_schedules_match_one_device_reference(name, shape):
    trainer, _, params, batch = setup(name)
    ref_loss, ref_grads, _, _ = reference(name)
    loss, grads = jax.jit(jax.value_and_grad(trainer.loss_fn(shape)))(params, batch)
    np.testing.assert_allclose(float(loss), ref_loss, rtol=TOL[name])
    assert_trees_close(jax.device_get(grads), ref_grads, TOL[name], f"{name} {shape} grad")


SCHEDULE_STEPS = [("mlp", MeshShape(3, 2, 4), "zero1"), ("mlp", MeshShape(7, 1, 8), "fsdp"),
                  ("mlp", MeshShape(2, 2, 4, 2), "fsdp"),
                  ("mlp", MeshShape(3, 2, 4, 2), "replicate"),
                  ("gpt", MeshShape(5, 1, 8), "fsdp"), ("gpt", MeshShape(4, 2, 4, 2), "fsdp")]


@pytest.mark.parametrize("name,shape,mode", SCHEDULE_STEPS,
                         ids=[f"{n}-{s}-{m}" for n, s, m in SCHEDULE_STEPS])
def test_three_steps_on_uneven_and_circular_meshes_match_the_reference(name, shape, mode):
    test_three_compiled_steps_match_three_reference_steps(name, shape, mode)


class Awkward(LayerStack):
    """A user's model with an awkward layer count: gated tanh layers, a regression head."""

    def __init__(self, layers: int = 7, width: int = 12, seed: int = 0):
        rngs = nnx.Rngs(seed)
        self.num_layers = layers
        self.inp = nnx.Linear(5, width, rngs=rngs)
        self.blocks = stack_layers(lambda r: GatedLayer(width, r), layers, rngs)
        self.out = nnx.Linear(width, 2, rngs=rngs)

    def embed(self, batch):
        return self.inp(batch["x"])

    def head_loss(self, h, batch):
        return jnp.mean((self.out(h) - batch["y"]) ** 2)

    def example_batch(self, n, seed=0):
        rng = np.random.default_rng(seed)
        return {"x": rng.normal(size=(n, 5)).astype(np.float32),
                "y": rng.normal(size=(n, 2)).astype(np.float32)}


class GatedLayer(nnx.Module):
    def __init__(self, width, rngs):
        self.value = nnx.Linear(width, width, rngs=rngs)
        self.gate = nnx.Linear(width, width, rngs=rngs)

    def __call__(self, h):
        return h + jnp.tanh(self.value(h)) * jax.nn.sigmoid(self.gate(h))


@pytest.mark.parametrize("shape", [MeshShape(3, 2, 4), MeshShape(6, 1, 8),
                                   MeshShape(3, 2, 4, 2), MeshShape(2, 4, 2, 3)],
                         ids=str)
def test_a_user_model_with_seven_layers_trains_exactly_on_uneven_and_circular_meshes(shape):
    model = Awkward()
    batch = model.example_batch(GLOBAL_BATCH, seed=3)
    fmodel, params = FunctionalModel.of(model)
    optimizer = make_optimizer()
    trainer = Trainer(model, optimizer, global_batch=GLOBAL_BATCH)
    ref_params, opt_state, ref_losses = params, optimizer.init(params), []
    for _ in range(3):
        loss, grads = jax.value_and_grad(fmodel.loss)(ref_params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, ref_params)
        ref_params = optax.apply_updates(ref_params, updates)
        ref_losses.append(float(loss))
    state, step, losses = trainer.init_state(shape), trainer.compile_step(shape), []
    for _ in range(3):
        state, metrics = step(state, trainer.put_batch(batch, shape))
        losses.append(float(metrics["loss"]))
    np.testing.assert_allclose(losses, ref_losses, rtol=SIMPLE_TOL)
    assert_trees_close(trainer.model_params(jax.device_get(state.params)),
                       jax.device_get(ref_params), SIMPLE_TOL,
                       str(shape))


def test_thirty_two_layers_on_three_stages_match_the_reference():
    model = GPT(dataclasses.replace(TEST_GPT, num_layers=32, d_model=16), rngs=nnx.Rngs(0))
    batch = jax.device_get(model.example_batch(GLOBAL_BATCH, seed=1))
    fmodel, params = FunctionalModel.of(model)
    trainer = Trainer(model, make_optimizer(), global_batch=GLOBAL_BATCH)
    expected = jax.jit(jax.value_and_grad(fmodel.loss))(params, batch)
    for shape in (MeshShape(3, 1, 4), MeshShape(3, 2, 4, 2)):  # 11+11+10; six groups
        actual = jax.jit(jax.value_and_grad(trainer.loss_fn(shape)))(params, batch)
        assert_trees_close(jax.device_get(actual), jax.device_get(expected), DEEP_TOL,
                           str(shape))


def test_grad_norm_matches_the_reference_and_skip_nonfinite_keeps_the_state():
    """Every step reports the gradient norm of the one-device reference; with
    skip_nonfinite a nan batch leaves parameters and optimizer state bit for bit as they
    were (decided on the device) and the next finite batch trains as if it never came."""
    _, fmodel, params, batch = setup("mlp")
    _, ref_grads, _, _ = reference("mlp")
    ref_norm = float(np.sqrt(sum(np.sum(np.square(g)) for g in jax.tree.leaves(ref_grads))))
    shape = MeshShape(2, 4, 2)
    trainer = Trainer(make_model("mlp"), make_optimizer(), global_batch=GLOBAL_BATCH,
                      skip_nonfinite=True)
    step = trainer.compile_step(shape)
    state = trainer.init_state(shape)
    before = jax.device_get(state)
    bad = {k: np.array(v) for k, v in batch.items()}
    first = next(k for k, v in bad.items() if np.issubdtype(v.dtype, np.floating))
    bad[first].flat[0] = np.nan
    state, metrics = step(state, trainer.put_batch(bad, shape))
    assert not np.isfinite(float(metrics["loss"]))
    after = jax.device_get(state)
    assert int(after.step) == 1
    assert_trees_close((after.params, after.opt_state), (before.params, before.opt_state), 0.0)
    state, metrics = step(state, trainer.put_batch(batch, shape))
    np.testing.assert_allclose(float(metrics["grad_norm"]), ref_norm, rtol=SIMPLE_TOL)
    _, _, ref_params, ref_losses = reference("mlp", steps=1)
    np.testing.assert_allclose(float(metrics["loss"]), ref_losses[0], rtol=SIMPLE_TOL)
    assert_trees_close(trainer.model_params(jax.device_get(state.params)), ref_params,
                       SIMPLE_TOL, "after a skipped step")


# -- the pipeline's named steps (meshscale.model.pipeline), each on its own ---------------
def test_ring_links_close_the_ring_only_for_the_circular_schedule():
    assert pipeline.ring_links(Schedule(8, 4, 1, 4)) == [(0, 1), (1, 2), (2, 3)]
    assert pipeline.ring_links(Schedule(8, 4, 2, 4)) == [(0, 1), (1, 2), (2, 3), (3, 0)]
    assert pipeline.ring_links(Schedule(8, 1, 1, 2)) == []


# (tick, stage) -> (item, active, microbatch, round), written out by hand; bubble ticks
# are inactive with their ids clipped into range.
GPIPE_P2_M3 = {(0, 0): (0, True, 0, 0), (0, 1): (0, False, 0, 0),
               (1, 0): (1, True, 1, 0), (1, 1): (0, True, 0, 0),
               (2, 0): (2, True, 2, 0), (2, 1): (1, True, 1, 0),
               (3, 0): (2, False, 2, 0), (3, 1): (2, True, 2, 0)}
CIRCULAR_P2_M2_R2 = {(0, 0): (0, True, 0, 0), (0, 1): (0, False, 0, 0),
                     (1, 0): (1, True, 1, 0), (1, 1): (0, True, 0, 0),
                     (2, 0): (2, True, 0, 1), (2, 1): (1, True, 1, 0),
                     (3, 0): (3, True, 1, 1), (3, 1): (2, True, 0, 1),
                     (4, 0): (3, False, 1, 1), (4, 1): (3, True, 1, 1)}


@pytest.mark.parametrize("sched,table", [(Schedule(4, 2, 1, 3), GPIPE_P2_M3),
                                         (Schedule(4, 2, 2, 2), CIRCULAR_P2_M2_R2)],
                         ids=["gpipe-p2-m3", "circular-p2-m2-r2"])
def test_tick_ids_match_a_hand_written_table(sched, table):
    assert len(table) == sched.ticks * sched.pipe
    for (t, stage), expected in table.items():
        ids = pipeline.tick_ids(sched, jnp.int32(t), jnp.int32(stage))
        assert tuple(int(x) if i != 1 else bool(x) for i, x in enumerate(ids)) == expected


@pytest.mark.parametrize("p,m,r", [(1, 4, 1), (3, 2, 1), (4, 5, 1), (3, 3, 2), (2, 4, 3)])
def test_tick_ids_agree_with_the_schedules_tick_rule(p, m, r):
    sched = Schedule(p * r, p, r, m)
    for t in range(sched.ticks):
        for stage in range(p):
            item, active, micro, k = (int(x) for x in pipeline.tick_ids(sched, t, stage))
            assert bool(active) == (sched.item(t, stage) is not None)
            if active:
                assert (item, micro, k) == (sched.item(t, stage), item % m, item // m)


def test_tick_inputs_gpipe_feeds_stage_zero_fresh_microbatches():
    sched = Schedule(4, 2, 1, 3)
    micro, received = jnp.arange(3.0)[:, None] * 10, jnp.full((1,), 99.0)
    for t in range(sched.ticks):
        x0, inbox = pipeline.tick_inputs(sched, received, jnp.int32(t), 0, micro)
        x1, _ = pipeline.tick_inputs(sched, received, jnp.int32(t), 1, micro)
        assert inbox is None
        assert float(x0[0]) == 10 * min(t, 2) and float(x1[0]) == 99


def test_tick_inputs_circular_sends_round_k_outputs_back_into_stage_zeros_inbox():
    sched = Schedule(4, 2, 2, 2)  # item i leaves stage 1 at tick i + 1, re-enters at i + 2
    inbox = jnp.array([[0.0], [10.0]])  # round 0's microbatches
    received = [0.0, 0.0, 100.0, 110.0, 200.0]  # stage 1's output of item t - 2
    fed = []
    for t, got in enumerate(received):
        got = jnp.array([got])
        (x0, _), (x1, inbox) = (pipeline.tick_inputs(sched, (got, inbox), jnp.int32(t),
                                                     stage, None) for stage in (0, 1))
        assert float(x1[0]) == float(got[0])  # other stages: what was received
        fed.append(float(x0[0]))
    assert fed == [0.0, 10.0, 100.0, 110.0, 200.0]
    np.testing.assert_array_equal(inbox, [[200.0], [110.0]])


def _on_pipe(fn, p, out_specs):
    """`fn` on a (p, 1) mesh, its argument split over pipe."""
    return jax.jit(jax.shard_map(fn, mesh=make_mesh(MeshShape(p, 1)),
                                 in_specs=P(PIPE), out_specs=out_specs))


@pytest.mark.parametrize("layers,p,r", [(5, 2, 1), (8, 4, 1), (4, 2, 2), (6, 2, 3), (8, 2, 2),
                                         (8, 4, 2), (7, 2, 2)], ids=lambda v: str(v))
def test_each_stages_stored_slice_is_the_groups_it_runs_in_round_order(layers, p, r):
    """The stored stack (`meshscale.layout.stacking`: one layer axis, or [r, p c] on a
    circular mesh), padded and split over pipe as `sharding` says, hands stage s exactly
    the rows of `Schedule.slot_rows[s]`: group k p + s in round k, with no regroup."""
    sched = Schedule(layers, p, r, p)
    shape = MeshShape(p, 1, p, r)
    model = {"blocks": {"w": jax.ShapeDtypeStruct((layers, 3), jnp.float32)}}
    stored = sharding.stored_params(model, mesh_shape=shape, num_layers=layers,
                                    rows=sched.rows, mode="fsdp")
    spec = sharding.state_specs(stored, None, mesh_shape=shape, num_layers=layers,
                                mode="fsdp")[0]["blocks"]["w"]
    rows = jnp.arange(layers, dtype=jnp.float32)[:, None] * jnp.ones(3)  # row i holds i
    padded = padding.pad({"blocks": {"w": rows}}, stored, layers)["blocks"]["w"]
    assert padded.shape == stored["blocks"]["w"].shape
    local = jax.jit(jax.shard_map(lambda x: x[None], mesh=make_mesh(MeshShape(p, 1)),
                                  in_specs=spec, out_specs=P(PIPE)))(padded)
    want = np.where(sched.slot_layers >= 0, sched.slot_rows, 0)  # padding rows are zeros
    np.testing.assert_array_equal(np.asarray(local)[..., 0].reshape(want.shape), want)
    # and the model's own rows come back, in layer order, from either form
    np.testing.assert_array_equal(padding.cut({"blocks": {"w": padded}}, model)["blocks"]["w"],
                                  rows)


@pytest.mark.parametrize("r,expected", [(1, [0, 1, 2, 3]), (2, [4, 1, 2, 3])])
def test_shift_hands_each_stage_its_predecessors_output(r, expected):
    sched = Schedule(8, 4, r, 4)
    shifted = _on_pipe(lambda y: pipeline.shift(sched, y), 4, P(PIPE))
    np.testing.assert_array_equal(shifted(jnp.arange(1.0, 5.0)), expected)


@pytest.mark.parametrize("scatter", [False, True])
def test_collect_outputs_takes_the_last_stages_last_round(scatter):
    sched = Schedule(4, 2, 1, 2)  # 3 ticks; stage 1 finishes items 0, 1 at ticks 1, 2
    t, row = np.arange(3)[:, None, None], np.arange(2)[None, :, None]
    outs = jnp.asarray(np.concatenate([100 * s + 10 * t + row for s in range(2)]), jnp.float32)
    collect = _on_pipe(lambda o: pipeline.collect_outputs(sched, o, scatter=scatter), 2,
                       P(PIPE) if scatter else P())
    np.testing.assert_array_equal(collect(outs)[:, 0], [110, 111, 120, 121])


def test_pipeline_loss_uses_the_stored_params_and_specs_it_is_given(monkeypatch):
    """Given the Trainer's stored shapes and specs, the loss derives neither and computes
    bit for bit what it computes from its own (the same rule, `layout.sharding`)."""
    trainer, fmodel, params, batch = setup("mlp")
    shape = MeshShape(2, 2, 2)
    mesh = trainer.mesh(shape)
    derived = pipeline.pipeline_loss(fmodel, shape, mesh, global_batch=GLOBAL_BATCH,
                                     state_sharding=trainer.state_sharding)
    stored, specs = trainer.abstract_state(shape).params, trainer.specs(shape).params

    def refuse(*_, **__):
        raise AssertionError("pipeline_loss re-derived what it was given")

    monkeypatch.setattr(sharding, "padded_abstract", refuse)
    monkeypatch.setattr(sharding, "state_specs", refuse)
    given = pipeline.pipeline_loss(fmodel, shape, mesh, global_batch=GLOBAL_BATCH,
                                   state_sharding="replicate", stored=stored, specs=specs)
    monkeypatch.undo()
    expected = jax.device_get(jax.jit(jax.value_and_grad(derived))(params, batch))
    actual = jax.device_get(jax.jit(jax.value_and_grad(given))(params, batch))
    jax.tree.map(np.testing.assert_array_equal, actual, expected)
