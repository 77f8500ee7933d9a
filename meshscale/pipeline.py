"""The pipelined loss over the ("pipe", "data") mesh: GPipe with `shard_map` + `ppermute`.

Three parts, so that activations shrink with the mesh:

1. ``embed`` runs outside the pipeline, batch-split over every device (`rows_spec`);
2. only the hidden state ``h`` crosses the pipeline: each replica (a column of the mesh
   along ``data``) cuts its ``B / data`` rows into ``microbatches``; stage ``s`` holds
   layers ``[s L/p, (s+1) L/p)``; at tick ``t`` of ``M + p - 1`` stage 0 takes
   microbatch ``t``, every active stage runs its layers and hands the result to the next
   stage (``ppermute``); bubble ticks skip the layers (Huang et al. 2019, "GPipe"; bubble
   share ``(p - 1) / (M + p - 1)``). The last stage's outputs are scattered back over
   the column's devices;
3. ``head_loss`` runs outside the pipeline too, batch-split like ``embed``: the logits
   (often the largest activation of an LM) exist once per row, on one device.

This is MaxText's arrangement (embedding and head outside the stage loop). Layers are
rematerialised per `Remat` policy. With ``"fsdp"`` state sharding each layer's
parameters are gathered over ``data`` just before the layer runs, inside the
rematerialised part (so again in the backward pass), and their gradients are
reduce-scattered by the transpose: a device never holds more than one whole layer.
The backward pass is JAX autodiff through the loop; the result equals
the one-device reference ``head_loss(run_layers(embed(batch)), batch)``.

Nothing here touches optimizer state or decides shapes; `meshscale.train` does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, get_args

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from meshscale import rng as rng_lib
from meshscale import sharding
from meshscale.errors import InvalidMeshShape
from meshscale.mesh import AXES, DATA, PIPE, MeshShape
from meshscale.model import (
    Batch,
    FunctionalModel,
    Params,
    call_layer,
    cast_floats,
    layer_inputs,
    mean_loss,
)

Remat = Literal["none", "layer", "stage"]
REMATS: tuple[str, ...] = get_args(Remat)


# What a tick keeps from its forward pass for the backward pass: its stage input
# ("stage"), every layer's input ("layer", which recomputes one layer at a time), or all.
LAYER_INPUT = "meshscale_layer_input"
_POLICIES = {
    "stage": None,
    "layer": jax.checkpoint_policies.save_only_these_names(LAYER_INPUT),
    "none": jax.checkpoint_policies.everything_saveable,
}


def check_remat(remat: str | bool) -> Remat:
    """`remat` as a policy name; ``True``/``False`` mean ``"layer"``/``"none"``."""
    if remat is True or remat is False:
        return "layer" if remat else "none"
    if remat not in REMATS:
        raise InvalidMeshShape(f"remat must be one of {', '.join(REMATS)}, got {remat!r}")
    return remat  # type: ignore[return-value]


def _varying(x: jax.Array) -> jax.Array:
    """Mark `x` as varying over both mesh axes (needed for scan carries and cond branches)."""
    aval = jax.typeof(x)
    manual = getattr(aval, "manual_axis_type", None)  # jax >= 0.10; older: aval.vma
    varying = manual.varying if manual is not None else aval.vma
    missing = tuple(a for a in AXES if a not in varying)
    return lax.pcast(x, missing, to="varying") if missing else x


def _gather_over_data(x: jax.Array, spec: P) -> jax.Array:
    """One layer's whole leaf from its ``data`` shards (FSDP); as is when not split.

    `spec` is the stacked leaf's spec; `x` is one layer of it (no layer axis)."""
    dim = sharding.data_dim(spec)
    return x if dim is None else lax.all_gather(x, DATA, axis=dim - 1, tiled=True)


def pipeline_loss(
    fmodel: FunctionalModel, shape: MeshShape, mesh: Mesh, *, global_batch: int,
    state_sharding: sharding.StateSharding = "fsdp", remat: Remat = "layer",
    compute_dtype: Any = None,
) -> Callable[[Params, Batch], jax.Array]:
    """``(params, batch, rng=None) -> loss`` computed pipelined on `mesh`; differentiable.

    `rng` is a step's key (`meshscale.rng`); layers then get per-example keys that do
    not depend on the mesh."""
    p, m = shape.pipe, shape.microbatches
    ticks = m + p - 1
    forward = [(i, i + 1) for i in range(p - 1)]
    rows = sharding.rows_spec(shape, global_batch)
    per_stage = fmodel.num_layers // p
    specs = sharding.tree_specs(fmodel.abstract_params(), mesh_shape=shape,
                                num_layers=fmodel.num_layers,
                                split_over_data=state_sharding == "fsdp")["blocks"]
    rows_over_pipe = rows != P(DATA)

    def run_stage(blocks: Params, h: jax.Array, side, keys) -> jax.Array:
        first = lax.axis_index(PIPE) * per_stage  # this stage's first layer in the stack

        def apply(h, layer_params, index):
            # FSDP: gathered layer by layer, inside the rematerialised part, so a stage never
            # holds more than one layer's whole parameters (and their gradient).
            layer_params = jax.tree.map(_gather_over_data, layer_params, specs)
            rng = rng_lib.layer_keys(keys, first + index)
            return call_layer(fmodel.merge_layer(layer_params), h, side, rng)

        if remat == "layer":  # the backward pass recomputes one layer at a time
            apply = jax.checkpoint(apply)

        def one_layer(h, xs):
            return apply(checkpoint_name(h, LAYER_INPUT), *xs), None

        return lax.scan(one_layer, h, (blocks, jnp.arange(per_stage)))[0]

    def stage_or_pass(blocks: Params, x: jax.Array, side, keys, active: jax.Array):
        return lax.cond(active, run_stage, lambda _, h, *__: h, blocks, x, side, keys)

    # Checkpointed around the cond: the tick then keeps (x, active) and the loop-invariant
    # parameters, which the scan hoists out; a cond differentiated as is keeps its
    # branches' residuals per tick, the stage's parameters included (measured).
    stage_or_pass = jax.checkpoint(stage_or_pass, policy=_POLICIES[remat])

    def stages(blocks: Params, h0: jax.Array, side, keys) -> jax.Array:
        # Everything the loop reads is made varying over both axes *before* the loop: the
        # transpose of that cast is a psum over pipe, which must run on every device, never
        # inside a branch of the stage conds below (a collective whose devices take
        # different branches deadlocks). The FSDP gathers inside `run_stage` are over
        # data only: those devices share a stage and tick, so they take the same branch.
        blocks, h0, side, keys = jax.tree.map(_varying, (blocks, h0, side, keys))
        stage = lax.axis_index(PIPE)
        split = lambda x: x.reshape(m, x.shape[0] // m, *x.shape[1:])
        pick = lambda tree, i: jax.tree.map(
            lambda x: lax.dynamic_index_in_dim(x, i, keepdims=False), tree)
        micro, side, keys = split(h0), jax.tree.map(split, side), jax.tree.map(split, keys)

        def tick(received, t):
            x = jnp.where((stage == 0) & (t < m), pick(micro, jnp.minimum(t, m - 1)), received)
            active = (t >= stage) & (t < stage + m)
            mine = jnp.clip(t - stage, 0, m - 1)  # the microbatch this stage holds
            y = stage_or_pass(blocks, x, pick(side, mine), pick(keys, mine), active)
            sent = lax.ppermute(y, PIPE, forward) if p > 1 else y
            return sent, y

        _, outs = lax.scan(tick, jnp.zeros_like(micro[0]), jnp.arange(ticks))
        out = outs[p - 1:].reshape(h0.shape)  # the last stage's outputs, microbatch order
        out = jnp.where(stage == p - 1, out, jnp.zeros_like(out))
        if rows_over_pipe:  # each stage keeps its share of the column's rows
            return lax.psum_scatter(out, PIPE, scatter_dimension=0, tiled=True)
        return lax.psum(out, PIPE)

    def loss_fn(params: Params, batch: Batch, rng: jax.Array | None = None) -> jax.Array:
        def constrain(tree):
            return jax.tree.map(
                lambda x: lax.with_sharding_constraint(x, NamedSharding(mesh, rows)), tree)

        batch = constrain(batch)
        params = cast_floats(params, compute_dtype)  # float32 master weights stay outside
        model = fmodel.merge(params)
        h0 = constrain(model.embed(batch))
        side = constrain(layer_inputs(model, batch))
        keys = constrain(rng_lib.example_keys(rng, global_batch))
        per_example = jax.tree.map(lambda _: P(DATA), (side, keys))
        body = jax.shard_map(stages, mesh=mesh,
                             in_specs=(specs, P(DATA), *per_example), out_specs=rows)
        h = body(params["blocks"], h0, side, keys)
        return mean_loss(model.head_loss(h, batch))

    return loss_fn
