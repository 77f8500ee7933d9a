"""The pipelined loss over the ("pipe", "data") mesh: GPipe with `shard_map` + `ppermute`.

Each replica (a column of the mesh along ``data``) gets ``B / data`` examples, cut into
``microbatches``; stage ``s`` holds layers ``[s L/p, (s+1) L/p)``. At tick ``t`` of
``M + p - 1`` ticks, stage 0 embeds microbatch ``t``, every stage runs its layers on what
it holds and hands the result to the next stage (``ppermute``), and the last stage turns
microbatch ``t - p + 1`` into its loss (Huang et al. 2019, "GPipe"; bubble share
``(p - 1) / (M + p - 1)``). ``embed`` runs only on stage 0 and ``head_loss`` only on the
last stage (``lax.cond`` on the stage index), so neither is computed redundantly;
stages skip their layers on bubble ticks. The backward pass is JAX autodiff through
the whole loop; the result equals the one-device reference loss.

Nothing here touches optimizer state or decides shapes; `meshscale.train` does.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from meshscale.mesh import AXES, DATA, PIPE, MeshShape
from meshscale.model import Batch, FunctionalModel, Params


def param_specs(params: Params) -> Params:
    """Block leaves split over ``pipe`` on their layer axis; everything else replicated."""
    def specs(key, sub):
        spec = P(PIPE) if key == "blocks" else P()
        return jax.tree.map(lambda _: spec, sub)

    return {key: specs(key, sub) for key, sub in params.items()}


def _varying(x: jax.Array) -> jax.Array:
    """Mark `x` as varying over both mesh axes (needed for scan carries and cond branches)."""
    aval = jax.typeof(x)
    manual = getattr(aval, "manual_axis_type", None)  # jax >= 0.10; older: aval.vma
    varying = manual.varying if manual is not None else aval.vma
    missing = tuple(a for a in AXES if a not in varying)
    return lax.pcast(x, missing, to="varying") if missing else x


def pipeline_loss(
    fmodel: FunctionalModel, shape: MeshShape, mesh: Mesh, *, remat: bool = False
) -> Callable[[Params, Batch], jax.Array]:
    """``(params, batch) -> mean loss`` computed pipelined on `mesh`; differentiable."""
    p, m = shape.pipe, shape.microbatches
    ticks = m + p - 1
    forward = [(i, i + 1) for i in range(p - 1)]

    def local_loss(params: Params, batch: Batch) -> jax.Array:
        # Everything the loop reads is made varying over both axes *before* the loop: the
        # transpose of that cast is a psum, which must run on every device, never inside a
        # branch of the stage conds below (a collective inside a cond deadlocks).
        params, batch = jax.tree.map(_varying, (params, batch))
        stage = lax.axis_index(PIPE)
        model = fmodel.merge(params)  # model.blocks holds this stage's L/p layers
        block_def, block_state = nnx.split(model.blocks)
        micro = jax.tree.map(lambda x: x.reshape(m, x.shape[0] // m, *x.shape[1:]), batch)

        def microbatch(i):
            return jax.tree.map(lambda x: lax.dynamic_index_in_dim(x, i, keepdims=False), micro)

        def run_stage(h):
            def one_layer(h, layer_state):
                return nnx.merge(block_def, layer_state)(h), None

            return lax.scan(one_layer, h, block_state)[0]

        if remat:
            run_stage = jax.checkpoint(run_stage)
        h_spec = jax.eval_shape(model.embed, microbatch(0))
        no_loss = _varying(jnp.zeros((), jnp.float32))

        def tick(carry, t):
            received, total = carry
            first_in = (stage == 0) & (t < m)
            x = lax.cond(first_in, lambda: model.embed(microbatch(jnp.minimum(t, m - 1))),
                         lambda: received)
            active = (t >= stage) & (t < stage + m)
            y = lax.cond(active, run_stage, lambda h: h, x)
            out = t - (p - 1)
            last_out = (stage == p - 1) & (out >= 0)
            loss = lax.cond(
                last_out,
                lambda: model.head_loss(y, microbatch(jnp.maximum(out, 0))).astype(jnp.float32),
                lambda: no_loss)
            sent = lax.ppermute(y, PIPE, forward) if p > 1 else y
            return (sent, total + loss), None

        start = (_varying(jnp.zeros(h_spec.shape, h_spec.dtype)), no_loss)
        (_, total), _ = lax.scan(tick, start, jnp.arange(ticks))
        return lax.psum(total, AXES) / (m * shape.data)

    def loss_fn(params: Params, batch: Batch) -> jax.Array:
        batch_specs = jax.tree.map(lambda _: P(DATA), batch)
        sharded = jax.shard_map(local_loss, mesh=mesh, in_specs=(param_specs(params), batch_specs),
                                out_specs=P())
        return sharded(params, batch)

    return loss_fn
