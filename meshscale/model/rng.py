"""Randomness in layers (dropout) that does not depend on the mesh.

A stateful `nnx.Rngs` in a layer would draw differently per stage and per microbatch
split. Instead every random key is a pure function of (seed, step, example, layer): the
trainer folds the step into its seed, `example_keys` folds in each example's row in the
global batch, `layer_keys` the layer's index in the stack. So the same step gives the
same masks on every mesh, and the one-device reference draws exactly the same.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def step_key(seed: int | None, step: jax.Array) -> jax.Array | None:
    """The key of one training step (None when the trainer has no seed)."""
    return None if seed is None else jax.random.fold_in(jax.random.key(seed), step)


def example_keys(key: jax.Array | None, rows: int) -> jax.Array | None:
    """One key per example (as raw key data, ``uint32[rows, ...]``): row ``i`` gets
    ``fold_in(key, i)``. Raw data, so it travels through `shard_map` like any array."""
    if key is None:
        return None
    return jax.random.key_data(jax.vmap(lambda i: jax.random.fold_in(key, i))(
        jnp.arange(rows)))


def layer_keys(data: jax.Array | None, index: jax.Array | int) -> jax.Array | None:
    """The per-example keys of layer `index` (typed keys, leading axis = examples)."""
    if data is None:
        return None
    return jax.vmap(lambda k: jax.random.fold_in(k, index))(jax.random.wrap_key_data(data))


def dropout(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
    """Inverted dropout of `x` with one key per example (leading axis of `x` and `rng`);
    the identity when `rng` is None (evaluation) or `rate` is 0."""
    if rng is None or not rate:
        return x
    keep = jax.vmap(lambda k, row: jax.random.bernoulli(k, 1.0 - rate, row.shape))(rng, x)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)
