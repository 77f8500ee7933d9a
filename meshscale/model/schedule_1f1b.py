"""The 1F1B and zero-bubble schedules' loss and gradients: an explicit backward inside
one `shard_map`.

A prototype (#24) beside the GPipe loss (`meshscale.model.pipeline`): the same stages,
layers and FSDP gathers, but no autodiff through the tick loop. The loop plays a slot
table (`meshscale.layout.schedule.SlotTable`, 1F1B's or zero-bubble's): in each slot a
stage runs the F, the B (input gradient) or the W (weight gradient) of one microbatch
(`meshscale.model.stage_split`), then two ``ppermute``s carry outputs to stage ``s + 1``
and cotangents to stage ``s - 1``. A stage keeps stage inputs from their arrival to
their B in a ring of buffers at ``m % size`` (1F1B: at most ``p``), each cotangent in one
buffer until its B, and each layer's input and output cotangent from B to W (1F1B: one
microbatch's; zero-bubble: up to its in-flight cap); never the replica's whole batch as
GPipe does (`SlotTable.rings`).

The head runs inside the loop, because the last stage's backward of microbatch ``m``
needs ``m``'s loss cotangent right after ``m``'s forward: in the slot after the last
stage's F of ``m`` every stage of the column gets its output (a ``psum`` over pipe),
computes ``head_loss`` and its vjp on its ``1/p`` share of the rows (head parameters
whole, replicated in this prototype), and the rows' cotangents are gathered back. The
embedding runs outside, as in GPipe: the loop returns ``d h0`` and ``jax.vjp`` of
``embed`` finishes the gradient. `schedule_loss` wraps it all in a `jax.custom_vjp`, so
``jax.value_and_grad(loss_fn)`` works as with `pipeline_loss`.

The loss is exact when ``head_loss`` is a mean over rows (equal shares average to the
batch mean) or a ``(loss_sum, weight)`` pair whose weight does not depend on ``h`` (a
count of real tokens: it is read once, before the loop, from the head on zeros).
Prototype limits (each refused with a one-line error): ``remat="layer"`` or
``"stage"``; ``repeats == 1``; no floating ``layer_inputs``; a microbatch's rows
divisible by ``pipe``. B and W each run the stage forward again from what they hold
(recompute: F, B about 3 F-costs with their recomputes, W about 2), so the lockstep slots,
which the tables count as equal, are not yet balanced.

Never: runs GPipe under the 1F1B name, or changes the stored state's layout (a
checkpoint does not depend on the schedule).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from meshscale.errors import InvalidArgument, InvalidMeshShape
from meshscale.layout import sharding
from meshscale.layout.mesh import DATA, PIPE, MeshShape
from meshscale.layout.padding import pad
from meshscale.layout.schedule import IDLE, Schedule, slot_table
from meshscale.model import rng as rng_lib
from meshscale.model import stage_grad, stage_split
from meshscale.model.contract import (
    Batch,
    FunctionalModel,
    Params,
    cast_floats,
    layer_inputs,
    mean_loss,
)
from meshscale.model.pipeline import Plan, _varying, stored_and_specs
from meshscale.model.stage_grad import _pick

BLOCKS = sharding.BLOCKS


@dataclasses.dataclass(frozen=True, eq=False)
class Loop:
    """The per-mesh constants of the loop: the stage plan, the slot table's
    columns as arrays (``[slots, pipe]``; ``head[u]``: the microbatch whose head runs
    after slot ``u``, or `IDLE`), the rings' sizes (stage inputs, cotangents: the most
    a stage holds at once, `SlotTable.in_flight`, `SlotTable.cotangents_waiting`)."""

    plan: Plan
    forward: np.ndarray
    backward: np.ndarray
    weight: np.ndarray
    head: np.ndarray
    ring: int
    ct_ring: int
    w_ring: int


def _put(buf: jax.Array, x: jax.Array, m: jax.Array, ring: int) -> jax.Array:
    """`buf` with `x` at slot ``m % ring`` when ``m`` is a microbatch (else unchanged)."""
    i = jnp.maximum(m, 0) % ring
    kept = jnp.where(m >= 0, x, lax.dynamic_index_in_dim(buf, i, keepdims=False))
    return lax.dynamic_update_index_in_dim(buf, kept, i, 0)


def _head_share(fmodel: FunctionalModel, rest: Params, blocks_shape: Any, y: jax.Array,
                batch: Batch, weight: Any) -> tuple[jax.Array, jax.Array, Params]:
    """``(loss, d y, d rest)`` of this device's share of one microbatch's rows: the
    output `y` gathered from the last stage, this stage's ``1/p`` of its rows (`batch`:
    the same rows). A mean ``head_loss`` is scaled by `weight` (``1 /`` the number of
    equal shares); a ``(loss_sum, weight)`` pair's sum is divided by the batch's whole
    weight, `weight` here (it must not depend on ``h``: a count of real tokens)."""
    p, stage = lax.axis_size(PIPE), lax.axis_index(PIPE)
    share = y.shape[0] // p

    def loss(rest, h):
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), blocks_shape)
        model = fmodel.merge({**rest, BLOCKS: zeros})  # the head reads no block
        out = model.head_loss(h, batch)
        if isinstance(out, tuple | list) and len(out) == 2:
            return jnp.asarray(out[0], jnp.float32) / weight
        return mean_loss(out) * weight

    value, vjp = jax.vjp(loss, rest, lax.dynamic_slice_in_dim(y, stage * share, share, 0))
    d_rest, d_share = vjp(jnp.ones_like(value))
    return value, lax.all_gather(d_share, PIPE, axis=0, tiled=True), d_rest


def _slot(loop: Loop, fmodel, rest, blocks_shape, micro, batch, side, keys, weight,
          read, carry, row):
    """One slot of the table on this device (module doc): F, the head, B, W, shifts."""
    plan, ring = loop.plan, loop.ring
    p, stage = plan.sched.pipe, lax.axis_index(PIPE)
    inputs, cts, w_inputs, w_cts, acc, d_h0, loss, d_rest = carry
    fwd, bwd, wgt, head = row
    call = stage_grad.make_tick_call(plan)
    zero = jnp.zeros((), jnp.int32)

    def held(m):  # a stage input this stage holds (its ring)
        return lax.dynamic_index_in_dim(inputs, jnp.maximum(m, 0) % ring, keepdims=False)

    # F: this stage's layers on microbatch fwd[stage]; the output goes to stage s + 1.
    # Stage 0's input is gathered from every stage's share of h0 (and then held).
    fresh = lax.all_gather(_pick(micro, jnp.maximum(fwd[0], 0)), PIPE, axis=0, tiled=True)
    m_f = fwd[stage]
    x = jnp.where(stage == 0, fresh, held(m_f))
    inputs = _put(inputs, x, jnp.where(stage == 0, m_f, IDLE), ring)
    y = call(acc, read, x, _pick(side, jnp.maximum(m_f, 0)), _pick(keys, jnp.maximum(m_f, 0)),
             zero, m_f >= 0)[0]
    got = lax.ppermute(y, PIPE, [(i, i + 1) for i in range(p - 1)])
    inputs = _put(inputs, got, jnp.where(stage > 0, fwd[jnp.maximum(stage - 1, 0)], IDLE),
                  ring)

    # The head of the microbatch that left the last stage in this slot (every device).
    def run_head(loss, d_rest, cts):
        out = lax.psum(jnp.where(stage == p - 1, y, jnp.zeros_like(y)), PIPE)
        value, d_y, g = _head_share(fmodel, rest, blocks_shape, out,
                                    _pick(batch, jnp.maximum(head, 0)), weight)
        cts = _put(cts, d_y, jnp.where(stage == p - 1, head, IDLE), loop.ct_ring)
        return loss + value, jax.tree.map(jnp.add, d_rest, g), cts

    loss, d_rest, cts = lax.cond(head >= 0, run_head, lambda *a: a, loss, d_rest, cts)

    # B: the input gradient of microbatch bwd[stage], from its input; what its W needs
    # (each layer's input and output cotangent) waits in the W ring.
    m_b = bwd[stage]
    mb = jnp.maximum(m_b, 0)
    ct = lax.dynamic_index_in_dim(cts, mb % loop.ct_ring, keepdims=False)
    d_x, ins, outs = stage_split.input_grad(plan, read, held(m_b), _pick(side, mb),
                                            _pick(keys, mb), ct, m_b >= 0)
    w_inputs = _put(w_inputs, ins, m_b, loop.w_ring)
    w_cts = _put(w_cts, outs, m_b, loop.w_ring)
    # d h0 of stage 0's microbatch, each stage keeping its share of the rows.
    d_share = lax.psum_scatter(jnp.where(stage == 0, d_x, jnp.zeros_like(d_x)), PIPE,
                               scatter_dimension=0, tiled=True)
    d_h0 = _put(d_h0, d_share, bwd[0], d_h0.shape[0])
    back = lax.ppermute(d_x, PIPE, [(i + 1, i) for i in range(p - 1)])
    cts = _put(cts, back, jnp.where(stage < p - 1, bwd[jnp.minimum(stage + 1, p - 1)], IDLE),
               loop.ct_ring)
    # W: the weight gradient of microbatch wgt[stage], added into acc in place.
    m_w = wgt[stage]
    mw = jnp.maximum(m_w, 0) % loop.w_ring
    acc = stage_split.weight_grad(
        plan, acc, read, lax.dynamic_index_in_dim(w_inputs, mw, keepdims=False),
        lax.dynamic_index_in_dim(w_cts, mw, keepdims=False), _pick(side, jnp.maximum(m_w, 0)),
        _pick(keys, jnp.maximum(m_w, 0)), m_w >= 0)
    return (inputs, cts, w_inputs, w_cts, acc, d_h0, loss, d_rest), None


def run_loop(loop: Loop, fmodel: FunctionalModel, blocks_shape: Any, blocks: Params,
             rest: Params, total_weight: Any, h0: jax.Array, batch: Batch, side: Any,
             keys: Any):
    """The `shard_map` body: ``(loss, d blocks, d rest, d h0)``, the loss and ``d rest``
    summed over the mesh. `h0` and `batch` are this device's share of its replica's
    rows (`share_rows`: ``1/p`` of each microbatch), `side` and `keys` the replica's."""
    plan = loop.plan
    sched = plan.sched
    m = sched.microbatches
    blocks, rest, h0, batch, side, keys = jax.tree.map(
        _varying, (blocks, rest, h0, batch, side, keys))
    read = lax.stop_gradient(blocks)
    split = lambda x: x.reshape(m, x.shape[0] // m, *x.shape[1:])  # noqa: E731
    micro, batch, side, keys = jax.tree.map(split, (h0, batch, side, keys))
    # a mean head: one share of the batch mean; a (sum, weight) head: the whole weight
    weight = 1.0 / (lax.axis_size(DATA) * sched.pipe * m) if total_weight is None \
        else total_weight
    zeros = functools.partial(jax.tree.map, jnp.zeros_like)
    whole = (micro.shape[1] * sched.pipe, *micro.shape[2:])  # a whole microbatch
    layered = (loop.w_ring, sched.slots, *whole)  # a microbatch's layer inputs
    carry = (jnp.zeros((loop.ring, *whole), micro.dtype),
             jnp.zeros((loop.ct_ring, *whole), micro.dtype), jnp.zeros(layered, micro.dtype),
             jnp.zeros(layered, micro.dtype), zeros(blocks),
             jnp.zeros_like(micro), jnp.zeros((), jnp.float32), zeros(rest))
    carry = jax.tree.map(_varying, carry)  # scan carries and cond branches: varying
    rows = tuple(jnp.asarray(t) for t in (loop.forward, loop.backward, loop.weight, loop.head))
    body = functools.partial(_slot, loop, fmodel, rest, blocks_shape, micro, batch, side,
                             keys, weight, read)
    (*_, acc, d_h0, loss, d_rest), _ = lax.scan(body, carry, rows)
    # A leaf not split over data got a gradient from each replica's rows: sum them (a
    # split one was reduce-scattered by the FSDP gather's transpose).
    acc = jax.tree.map(lambda g, s: g if sharding.data_dim(s) is not None
                       else lax.psum(g, DATA), acc, plan.specs)
    return (lax.psum(loss, (PIPE, DATA)), acc, jax.tree.map(
        lambda g: lax.psum(g, (PIPE, DATA)), d_rest), d_h0.reshape(h0.shape))


def share_rows(x: jax.Array, data: int, micro: int, pipe: int, *, back: bool = False):
    """`x`'s rows reordered so that splitting them over ``(data, pipe)`` gives each device
    ``1/pipe`` of every microbatch of its replica (`back`: the inverse)."""
    rows = x.shape[0] // (data * micro * pipe)
    order = (data, pipe, micro) if back else (data, micro, pipe)
    y = x.reshape(*order, rows, *x.shape[1:])
    return y.transpose(0, 2, 1, *range(3, y.ndim)).reshape(x.shape)


def check(fmodel: FunctionalModel, shape: MeshShape, global_batch: int, remat: str) -> None:
    """Raise (one line, naming the fix) unless this prototype runs `shape`."""
    rows = global_batch // (shape.data * shape.microbatches)
    if shape.schedule not in ("1f1b", "zb"):
        raise InvalidMeshShape(f"schedule_loss runs the 1f1b and zb schedules, {shape} is "
                              f"{shape.schedule}: use meshscale.model.pipeline.pipeline_loss")
    if remat not in ("layer", "stage"):
        raise InvalidArgument(f"the 1f1b loss needs remat='layer' or 'stage', got {remat!r}")
    if shape.repeats != 1:
        raise InvalidMeshShape(f"the 1f1b loss runs repeats=1 only, got {shape}: use repeats=1")
    if rows % shape.pipe:
        raise InvalidMeshShape(
            f"the 1f1b head splits a microbatch's {rows} rows over pipe={shape.pipe}: "
            f"choose global_batch / (data * microbatches) divisible by {shape.pipe}")


def _loop(fmodel: FunctionalModel, shape: MeshShape, specs: Params, remat: str) -> Loop:
    sched = Schedule.of(shape, fmodel.num_layers)
    plan = Plan(fmodel, sched, specs, remat, scatter=False)  # type: ignore[arg-type]
    table = slot_table(shape.schedule, sched.pipe, sched.microbatches)
    # The head of m runs after the slot of the last stage's F of m.
    return Loop(plan, table.forward, table.backward, table.weight, table.forward[:, -1],
                *table.rings())


def schedule_loss(
    fmodel: FunctionalModel, shape: MeshShape, mesh: Mesh, *, global_batch: int,
    state_sharding: sharding.StateSharding = "fsdp", remat: str = "layer",
    compute_dtype: Any = None, stored: Params | None = None, specs: Params | None = None,
):
    """``(params, batch, rng=None) -> loss`` computed by `shape`'s schedule (1f1b or zb)
    on `mesh`, as `meshscale.model.pipeline.pipeline_loss` (same arguments and loss); its
    gradient comes from the schedule's explicit backward (a `jax.custom_vjp`: the
    forward pass computes every gradient, the backward scales them)."""
    check(fmodel, shape, global_batch, remat)
    stored, specs = stored_and_specs(fmodel, shape, state_sharding, stored, specs)
    block_specs = specs[BLOCKS]
    loop = _loop(fmodel, shape, block_specs, remat)
    blocks_shape = fmodel.abstract_params()[BLOCKS]
    merge = lambda rest: fmodel.merge(  # noqa: E731 (outside the loop the head reads no block)
        {**rest, BLOCKS: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), blocks_shape)})

    def value_and_grads(params: Params, batch: Batch, rng: jax.Array | None):
        constrain = lambda tree, spec: jax.tree.map(  # noqa: E731
            lambda x: lax.with_sharding_constraint(x, NamedSharding(mesh, spec)), tree)
        shares = P((DATA, PIPE))  # h0 and the head's rows: 1/p of each microbatch a stage
        spread = functools.partial(share_rows, data=shape.data, micro=shape.microbatches,
                                   pipe=shape.pipe)
        mine = constrain(jax.tree.map(spread, batch), shares)  # embed and head, row-wise
        prepare = lambda p: cast_floats(pad(p, stored, fmodel.num_layers),  # noqa: E731
                                        compute_dtype)
        prepared, prepare_vjp = jax.vjp(prepare, params)
        rest = {k: v for k, v in prepared.items() if k != BLOCKS}
        h0, embed_vjp = jax.vjp(lambda rest: constrain(merge(rest).embed(mine), shares), rest)
        # Every stage runs every microbatch: side inputs and keys whole, in row order.
        side = layer_inputs(merge(rest), constrain(batch, P(DATA)))
        if any(jnp.issubdtype(x.dtype, jnp.floating) for x in jax.tree.leaves(side)):
            raise InvalidArgument("the 1f1b loss takes no floating layer_inputs yet: "
                                  "use schedule='gpipe' for this model")
        keys = rng_lib.example_keys(rng, global_batch)
        out = merge(rest).head_loss(jnp.zeros_like(h0), mine)  # only its weight is read
        total = jnp.asarray(out[1], jnp.float32) if isinstance(out, tuple | list) else None
        per_example = jax.tree.map(lambda _: P(DATA), (side, keys))
        body = jax.shard_map(
            functools.partial(run_loop, loop, fmodel, blocks_shape), mesh=mesh,
            in_specs=(block_specs, P(), P(), shares, shares, *per_example),
            out_specs=(P(), block_specs, P(), shares))
        loss, d_blocks, d_head, d_h0 = body(prepared[BLOCKS], rest, total, h0, mine, side,
                                            keys)
        (d_embed,) = embed_vjp(d_h0.astype(h0.dtype))
        d_rest = jax.tree.map(jnp.add, d_head, d_embed)
        (grads,) = prepare_vjp({**d_rest, BLOCKS: d_blocks})
        return loss, grads

    @jax.custom_vjp
    def loss_1f1b(params, batch, rng):
        return value_and_grads(params, batch, rng)[0]

    def fwd(params, batch, rng):
        return value_and_grads(params, batch, rng)

    def bwd(grads, ct):
        return jax.tree.map(lambda g: (g * ct).astype(g.dtype), grads), None, None

    loss_1f1b.defvjp(fwd, bwd)

    def loss_fn(params: Params, batch: Batch, rng: jax.Array | None = None) -> jax.Array:
        return loss_1f1b(params, batch, rng)

    return loss_fn
