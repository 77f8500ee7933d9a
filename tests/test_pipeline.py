"""Every mesh shape computes the one-device reference's loss, gradients and updates."""

import functools

import jax
import numpy as np
import optax
import pytest

from meshscale import InvalidMeshShape, MeshShape, Trainer
from meshscale.model import FunctionalModel
from meshscale.sharding import STATE_SHARDINGS
from tests.helpers import (
    DEEP_TOL,
    GLOBAL_BATCH,
    SIMPLE_TOL,
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
    assert_trees_close(jax.device_get(state.params), ref_params, TOL[name], f"{name} {shape}")


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
    with pytest.raises(InvalidMeshShape, match="remat must be one of none, layer, stage"):
        Trainer(make_model("mlp"), make_optimizer(), global_batch=GLOBAL_BATCH, remat="all")
    with pytest.raises(InvalidMeshShape, match="state_sharding must be one of replicate"):
        Trainer(make_model("mlp"), make_optimizer(), global_batch=GLOBAL_BATCH,
                state_sharding="zero3")
