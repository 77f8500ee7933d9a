"""The contract carries what real LM training needs, exactly on every mesh.

Token-weighted losses over padded and packed sequences, side inputs for every layer,
stacks of alternating layer kinds, bf16 compute; and a model that breaks the contract is
refused at construction with a `ContractError` naming the fix.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from meshscale.models.llama import Llama, LlamaConfig

from meshscale import ContractError, LayerStack, MeshShape, Trainer, stack_layers
from meshscale.model.contract import FunctionalModel, cast_floats
from meshscale.model.rng import step_key
from tests.helpers import DEEP_TOL, assert_trees_close

BATCH = 16
# Four layers alternating local (window 3) and global attention: two periods.
CFG = LlamaConfig(vocab=64, seq_len=12, num_layers=4, d_model=32, num_heads=4,
                  num_kv_heads=2, mlp_hidden=64, sliding_window=3, global_every=2)
SHAPES = [MeshShape(1, 8, 1), MeshShape(2, 4, 2), MeshShape(2, 2, 4), MeshShape(2, 1, 8),
          MeshShape(1, 1, 1)]
# bf16 keeps 8 significant bits: one bf16 ulp at unit scale. Measured on this model: the
# bf16 one-device reference is 9e-4 from the float32 one, a mesh 5e-4 from the bf16 one.
BF16_TOL = 2.0 ** -8


def ragged_batch(seed=1):
    """Left- and right-padded rows, rows packing two or three sequences, and full rows:
    the real tokens per row (and so per microbatch) differ widely."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, CFG.vocab, (BATCH, CFG.seq_len + 1)).astype(np.int32)
    segments = np.ones_like(tokens)
    for row in range(BATCH):
        kind = row % 4
        if kind == 0:  # right padding
            segments[row, rng.integers(3, CFG.seq_len):] = 0
        elif kind == 1:  # left padding
            segments[row, : rng.integers(2, CFG.seq_len - 3)] = 0
        elif kind == 2:  # packed: 2 or 3 sequences, then padding
            cuts = np.sort(rng.choice(np.arange(2, CFG.seq_len - 1), 2, replace=False))
            segments[row, cuts[0]:] = 2
            segments[row, cuts[1]:] = 3 if row % 8 == 2 else 0
    return {"tokens": tokens, "segments": segments.astype(np.int32)}


@functools.cache
def setup():
    model = Llama(CFG, rngs=nnx.Rngs(0))
    fmodel, params = FunctionalModel.of(model)
    return model, fmodel, params, ragged_batch()


@functools.cache
def reference(dtype=None):
    _, fmodel, params, batch = setup()
    loss = lambda p, b: fmodel.loss(cast_floats(p, dtype), b)
    return jax.device_get(jax.jit(jax.value_and_grad(loss))(params, batch))


def test_the_weighted_loss_is_the_token_weighted_mean():
    model, _, _, batch = setup()
    total, weight = model.head_loss(model.embed(batch), batch)
    seg = batch["segments"]
    real = ((seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] != 0)).sum()
    assert float(weight) == real and 0 < real < BATCH * CFG.seq_len
    per_row = ((seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] != 0)).sum(1)
    assert per_row.min() < per_row.max() / 2  # microbatch means would weigh rows wrongly
    assert np.isfinite(float(total))


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_padded_packed_alternating_stack_matches_one_device_reference(shape):
    model, _, params, batch = setup()
    trainer = Trainer(model, optax.adam(1e-3), global_batch=BATCH)
    assert trainer.num_layers == 2  # two periods of (local, global)
    ref_loss, ref_grads = reference()
    loss, grads = jax.jit(jax.value_and_grad(trainer.loss_fn(shape)))(params, batch)
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=DEEP_TOL)
    assert_trees_close(jax.device_get(grads), ref_grads, DEEP_TOL, str(shape))


def test_local_and_global_layers_really_differ():
    """The alternating stack is not one kind silently: without the window the loss moves."""
    _, _, _, batch = setup()
    model = Llama(CFG, rngs=nnx.Rngs(0))
    assert (model.blocks.kind0.window, model.blocks.kind1.window) == (3, 0)
    windowed = float(model.loss(batch))
    model.blocks.kind0.window = 0
    assert not np.isclose(windowed, float(model.loss(batch)), rtol=1e-4)


DROPOUT = LlamaConfig(**{**CFG.__dict__, "dropout": 0.25})


# Even meshes of the 4-layer model, and 12 layers in 6 (local, global) periods on uneven
# (4 stages hold 2, 2, 2, 0 periods) and circular (6 groups on 2x2) meshes: a layer's keys
# come from its index in the stack, whichever stage and round runs it.
DROPOUT_CASES = [(4, MeshShape(1, 8, 1)), (4, MeshShape(2, 2, 4)), (4, MeshShape(2, 1, 8)),
                 (12, MeshShape(4, 1, 4)), (12, MeshShape(2, 2, 2, repeats=3))]


@functools.cache
def dropout_reference(layers):
    """The dropout model with `layers` layers, its parameters, step 0's key, its one-device
    loss and gradients with that key, and its loss without keys: once per layer count."""
    _, _, _, batch = setup()
    model = Llama(LlamaConfig(**{**DROPOUT.__dict__, "num_layers": layers}), rngs=nnx.Rngs(0))
    fmodel, params = FunctionalModel.of(model)
    key = step_key(7, jnp.int32(0))
    ref = jax.device_get(jax.jit(jax.value_and_grad(fmodel.loss))(params, batch, key))
    return model, params, key, ref, float(fmodel.loss(params, batch))


@pytest.mark.parametrize("layers,shape", DROPOUT_CASES, ids=[f"{n}-{s}" for n, s in DROPOUT_CASES])
def test_dropout_draws_the_same_masks_on_every_mesh(layers, shape):
    _, _, _, batch = setup()
    model, params, key, (ref_loss, ref_grads), without_keys = dropout_reference(layers)
    trainer = Trainer(model, optax.adam(1e-3), global_batch=BATCH, example_batch=batch,
                      rng_seed=7)
    assert not np.isclose(float(ref_loss), without_keys, rtol=1e-3)
    loss, grads = jax.jit(jax.value_and_grad(trainer.loss_fn(shape)))(params, batch, key)
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=DEEP_TOL)
    assert_trees_close(jax.device_get(grads), jax.device_get(ref_grads), DEEP_TOL, str(shape))
    state = trainer.init_state(shape)  # the compiled step folds its step count in
    _, metrics = trainer.compile_step(shape)(state, trainer.put_batch(batch, shape))
    np.testing.assert_allclose(float(metrics["loss"]), float(ref_loss), rtol=DEEP_TOL)


@pytest.mark.parametrize("shape", [MeshShape(2, 4, 2), MeshShape(2, 1, 4)], ids=str)
def test_bf16_compute_matches_the_bf16_one_device_reference(shape):
    model, _, params, batch = setup()
    trainer = Trainer(model, optax.adam(1e-3), global_batch=BATCH, example_batch=batch,
                      compute_dtype=jnp.bfloat16)
    ref_loss, ref_grads = reference(jnp.bfloat16)
    loss, grads = jax.jit(jax.value_and_grad(trainer.loss_fn(shape)))(params, batch)
    assert loss.dtype == jnp.float32
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))  # master weights
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=BF16_TOL)
    assert_trees_close(jax.device_get(grads), ref_grads, BF16_TOL, f"bf16 {shape}")
    state = trainer.init_state(shape)
    state, metrics = trainer.compile_step(shape)(state, trainer.put_batch(batch, shape))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
    np.testing.assert_allclose(float(metrics["loss"]), float(ref_loss), rtol=BF16_TOL)


# -- refused at construction ------------------------------------------------------------
class Model(LayerStack):
    """A small model whose layer, embed and head can each be made to break the contract."""

    def __init__(self, layer, *, head=None, layers=2):
        self.num_layers = layers
        self.inp = nnx.Linear(3, 4, rngs=nnx.Rngs(0))
        self.blocks = stack_layers(layer, layers, nnx.Rngs(1))
        self.head = head

    def embed(self, batch):
        return self.inp(batch["x"])

    def head_loss(self, h, batch):
        return self.head(h) if self.head else jnp.mean(h ** 2)


class NeedsMore(nnx.Module):
    def __init__(self, rngs):
        self.lin = nnx.Linear(4, 4, rngs=rngs)

    def __call__(self, h, mask, positions, segments):
        return self.lin(h)


class Widens(nnx.Module):
    def __init__(self, rngs):
        self.lin = nnx.Linear(4, 5, rngs=rngs)

    def __call__(self, h):
        return self.lin(h)


class Sows(nnx.Module):
    def __init__(self, rngs):
        self.lin = nnx.Linear(4, 4, rngs=rngs)

    def __call__(self, h):
        self.sow(nnx.Intermediate, "act", h)
        return self.lin(h)


class Plain(nnx.Module):
    def __init__(self, rngs):
        self.lin = nnx.Linear(4, 4, rngs=rngs)

    def __call__(self, h):
        return self.lin(h)


EXAMPLE = {"x": np.zeros((4, 3), np.float32)}


@pytest.mark.parametrize("model,message", [
    (lambda: Model(NeedsMore), "a layer is called as layer\\(h\\), or layer\\(h, side\\)"),
    (lambda: Model(Widens), "a layer must keep h's shape and dtype"),
    (lambda: Model(Sows), "with sow\\(\\), which a compiled pipeline drops"),
    (lambda: Model(Plain, head=lambda h: h.mean(0)), "head_loss returned shape"),
    (lambda: Model(Plain, head=lambda h: (h.sum(), 1.0, 2.0)), "returned 3 values"),
], ids=["signature", "shape", "sow", "head-not-scalar", "head-triple"])
def test_contract_mistakes_are_refused_at_construction(model, message):
    with pytest.raises(ContractError, match=message):
        Trainer(model(), optax.sgd(0.1), global_batch=4, example_batch=EXAMPLE)


def test_sharding_annotations_are_refused_not_dropped():
    mesh = jax.make_mesh((2,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=jax.devices()[:2])
    annotated = lambda rngs: nnx.Linear(4, 4, kernel_init=nnx.with_partitioning(
        nnx.initializers.lecun_normal(), ("fsdp", None)), rngs=rngs)
    with jax.set_mesh(mesh):
        model = Model(annotated)
    with pytest.raises(ContractError, match="carries sharding annotations"):
        Trainer(model, optax.sgd(0.1), global_batch=4, example_batch=EXAMPLE)


def test_stack_of_kinds_that_does_not_repeat_whole_is_refused():
    with pytest.raises(ContractError, match="kinds=2 must be a positive int dividing"):
        stack_layers(lambda r, kind: Plain(r), 3, nnx.Rngs(0), kinds=2)


def test_the_batch_structure_can_come_from_the_first_batch(tmp_path):
    from meshscale import CheckpointPolicy, ElasticTrainer, SearchSpace, SwitchPolicy, Timing

    trainer = Trainer(Model(Plain), optax.sgd(0.1), global_batch=4)  # no example_batch
    with pytest.raises(ContractError, match="call ElasticTrainer.init\\(batch\\)"):
        trainer.compile_step(MeshShape(2, 1))
    elastic = ElasticTrainer(Trainer(Model(Plain), optax.sgd(0.1), global_batch=4),
                             checkpoint_dir=tmp_path, resources=2, space=SearchSpace(p_min=2),
                             timing=Timing(warmup=0, steps=1),
                             switching=SwitchPolicy(precompile="off"),
                             checkpoints=CheckpointPolicy(persistent_cache=False))
    state = elastic.init(EXAMPLE)
    state, metrics = elastic.step(state, EXAMPLE)
    assert np.isfinite(float(metrics["loss"]))
