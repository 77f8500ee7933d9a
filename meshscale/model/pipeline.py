"""The pipelined loss over the ("pipe", "data") mesh: GPipe with `shard_map` + `ppermute`.

Three parts, so that activations shrink with the mesh:

1. ``embed`` runs outside the pipeline, batch-split over every device (`rows_spec`);
2. only the hidden state ``h`` crosses the pipeline: each replica (a column of the mesh
   along ``data``) cuts its ``B / data`` rows into ``microbatches``; stage ``s`` holds
   its layer groups (`meshscale.layout.schedule`: one contiguous range, possibly uneven, or
   ``repeats`` of them for the circular schedule); at each tick every active stage runs
   one group on one microbatch and hands the result to the next stage (``ppermute``;
   with ``repeats > 1`` the last stage hands it back to stage 0 for the next round).
   Bubble ticks skip the layers (Huang et al. 2019, "GPipe"; bubble share
   ``(p - 1) / (r M + p - 1)``). The last stage's outputs are scattered back over the
   column's devices;
3. ``head_loss`` runs outside the pipeline too, batch-split like ``embed``: the logits
   (often the largest activation of an LM) exist once per row, on one device.

This is MaxText's arrangement (embedding and head outside the stage loop). Layers are
rematerialised per `Remat` policy. With ``"fsdp"`` state sharding each layer's
parameters are gathered over ``data`` just before the layer runs (again in the backward
pass), and their gradients are reduce-scattered by the transpose: a device never holds
more than one whole layer. The stored stack is padded with zero rows to a multiple of the
stages (`meshscale.layout.schedule`), which the loop skips, and stored so that each
stage's slice holds the groups it runs, in round order (`meshscale.layout.stacking`).
The backward pass is autodiff through the tick loop, except the stage call's
(`meshscale.model.stage_grad`, written by hand so that the stage's parameter gradient is
accumulated in one buffer); the result equals the one-device reference
``head_loss(run_layers(embed(batch)), batch)``.

The steps are named, as MaxText's ``Pipeline`` names them: `ring_links` (the shift's
``ppermute`` pairs), `tick_ids` (a stage's item, microbatch and round at a tick),
`tick_inputs` (stage 0's fresh microbatch or inbox, the others' received ``h``), `shift`,
`collect_outputs` (the last stage's outputs, ``psum`` / ``psum_scatter``) and
`stage_call` (one stage's layer group, or a bubble's pass); `stages` is the loop over
ticks and `Plan` its per-mesh constants.

Nothing here touches optimizer state or decides shapes; `meshscale.training.trainer` does.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, Literal, get_args

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from meshscale.errors import InvalidArgument
from meshscale.layout import sharding
from meshscale.layout.mesh import AXES, DATA, PIPE, MeshShape
from meshscale.layout.padding import pad
from meshscale.layout.schedule import Schedule
from meshscale.model import rng as rng_lib
from meshscale.model import stage_grad
from meshscale.model.contract import (
    Batch,
    FunctionalModel,
    Params,
    cast_floats,
    layer_inputs,
    mean_loss,
)
from meshscale.model.stage_grad import _pick

Remat = Literal["none", "layer", "stage"]
REMATS: tuple[str, ...] = get_args(Remat)


def check_remat(remat: str | bool) -> Remat:
    """`remat` as a policy name; ``True``/``False`` mean ``"layer"``/``"none"``."""
    if remat is True or remat is False:
        return "layer" if remat else "none"
    if remat not in REMATS:
        raise InvalidArgument(f"remat must be one of {', '.join(REMATS)}, got {remat!r}")
    return remat  # type: ignore[return-value]


def _varying(x: jax.Array) -> jax.Array:
    """Mark `x` as varying over both mesh axes (needed for scan carries and cond branches)."""
    aval = jax.typeof(x)
    manual = getattr(aval, "manual_axis_type", None)  # jax >= 0.10; older: aval.vma
    varying = manual.varying if manual is not None else aval.vma
    missing = tuple(a for a in AXES if a not in varying)
    return lax.pcast(x, missing, to="varying") if missing else x


# -- the schedule's steps: pure functions of the `Schedule` ---------------------------
def ring_links(sched: Schedule) -> list[tuple[int, int]]:
    """The ``ppermute`` pairs of one tick's shift: stage ``s`` to ``s + 1``; with
    ``repeats > 1`` also the last stage to stage 0 (round ``k + 1`` of a microbatch starts
    on stage 0 where round ``k`` left stage ``p - 1``)."""
    p = sched.pipe
    if sched.repeats > 1:
        return [(i, (i + 1) % p) for i in range(p)]
    return [(i, i + 1) for i in range(p - 1)]


def tick_ids(sched: Schedule, t: Any, stage: Any) -> tuple[Any, Any, Any, Any]:
    """``(item, active, microbatch, round)`` of `stage` at tick `t` (`Schedule.item`).

    Stage ``s`` runs item ``t - s`` (``round * M + microbatch``) when
    ``0 <= t - s < r M``; a bubble tick is inactive, its ids clipped into range (its
    result is never used)."""
    m, items = sched.microbatches, sched.repeats * sched.microbatches
    item = t - stage
    active = (item >= 0) & (item < items)
    item = jnp.clip(item, 0, items - 1)
    return item, active, item % m, item // m


def tick_inputs(sched: Schedule, carry: Any, t: jax.Array, stage: jax.Array,
                micro: jax.Array) -> tuple[jax.Array, jax.Array | None]:
    """``(x, inbox)``: what `stage` runs at tick `t`, and stage 0's updated inbox.

    Stage 0 takes a fresh microbatch, every other stage what the previous one sent
    (`shift`). GPipe (`carry` = received): microbatch ``t`` while ``t < M``; inbox None.
    Circular (`carry` = ``(received, inbox)``, the inbox first the `micro`batches):
    stage 0's inbox slot ``j`` holds round 0's input, then the last stage's output of
    item ``t - p`` (received now) for the next round."""
    p, m = sched.pipe, sched.microbatches
    if sched.repeats > 1:
        received, inbox = carry
        back = jnp.maximum(t - p, 0) % m
        kept = jnp.where(t >= p, received, _pick(inbox, back))
        inbox = lax.dynamic_update_index_in_dim(inbox, kept, back, 0)
        fresh = _pick(inbox, t % m)
    else:
        received, inbox, fresh = carry, None, _pick(micro, jnp.minimum(t, m - 1))
    return jnp.where(stage == 0, fresh, received), inbox


def shift(sched: Schedule, y: jax.Array) -> jax.Array:
    """A tick's outputs handed to the next stage (`ring_links`); a stage no link
    reaches (stage 0 of GPipe) receives zeros."""
    return lax.ppermute(y, PIPE, ring_links(sched)) if sched.pipe > 1 else y


def collect_outputs(sched: Schedule, outs: jax.Array, *, scatter: bool) -> jax.Array:
    """The last stage's outputs of the last round, microbatch order, from every tick's
    outputs `outs` (``[ticks, rows / M, ...]``), summed over ``pipe`` so that every stage
    of the column gets them; with `scatter` each stage keeps its share of the rows."""
    p, m = sched.pipe, sched.microbatches
    out = outs[sched.repeats * m - m + p - 1:]
    out = out.reshape(m * out.shape[1], *out.shape[2:])
    out = jnp.where(lax.axis_index(PIPE) == p - 1, out, jnp.zeros_like(out))
    if scatter:
        return lax.psum_scatter(out, PIPE, scatter_dimension=0, tiled=True)
    return lax.psum(out, PIPE)


# -- the stage call: the model's layers -----------------------------------------------
@dataclasses.dataclass(frozen=True, eq=False)
class Plan:
    """The per-mesh constants of one pipelined loss. `specs`: the stored block leaves'
    `PartitionSpec`s (where FSDP gathers); `scatter`: the rows end split over pipe too."""

    fmodel: FunctionalModel
    sched: Schedule
    specs: Params
    remat: Remat
    scatter: bool


def stage_call(plan: Plan) -> Callable[..., tuple[jax.Array, Any]]:
    """``(acc, blocks, x, side, keys, round, active) -> (y, acc)``: the stage's layer group
    on an active tick, ``x`` unchanged on a bubble tick.

    ``"layer"``/``"stage"`` remat: `stage_grad` (a backward pass written by hand, one
    stack of parameter gradients per device). ``"none"``: autodiff, everything saved."""
    if plan.remat != "none":
        return stage_grad.make_tick_call(plan)

    def run(blocks, x, side, keys, k):
        return stage_grad.stage_forward(plan, blocks, x, side, keys, k)[0]

    def call(acc, blocks, x, side, keys, k, active):
        if plan.sched.pipe == 1:  # every tick is active: no branch
            return run(acc, x, side, keys, k), acc
        return lax.cond(active, run, lambda _, h, *__: h, acc, x, side, keys, k), acc

    return call


def stages(plan: Plan, blocks: Params, h0: jax.Array, side: Any, keys: Any) -> jax.Array:
    """The pipeline on one device of the mesh (the `shard_map` body): every tick's
    inputs, ids, stage call and shift, then the last stage's outputs."""
    sched = plan.sched
    # Everything the loop reads is made varying over both axes *before* the loop: the
    # transpose of that cast is a psum over pipe, which must run on every device, never
    # inside a branch of the stage conds below (a collective whose devices take
    # different branches deadlocks). The FSDP gathers inside `run_stage` are over
    # data only: those devices share a stage and tick, so they take the same branch.
    # Each stage's stored slice is what it runs (`meshscale.layout.stacking`): not even
    # reshaped (XLA on CPU copied a reshaped stack whole, one more stack of parameters
    # per device, measured).
    blocks, h0, side, keys = jax.tree.map(_varying, (blocks, h0, side, keys))
    # The layers read `read`; `blocks` rides along the loop unread, and the gradient
    # arrives as its cotangent (`stage_grad`; with "none" remat `read` is `blocks`).
    read = blocks if plan.remat == "none" else lax.stop_gradient(blocks)
    stage = lax.axis_index(PIPE)
    m = sched.microbatches
    split = lambda x: x.reshape(m, x.shape[0] // m, *x.shape[1:])
    micro, side, keys = split(h0), jax.tree.map(split, side), jax.tree.map(split, keys)
    call = stage_call(plan)

    def tick(carry, t):
        carry, acc = carry
        x, inbox = tick_inputs(sched, carry, t, stage, micro)
        _, active, mine, k = tick_ids(sched, t, stage)  # mine: the microbatch held
        y, acc = call(acc, read, x, _pick(side, mine), _pick(keys, mine), k, active)
        sent = shift(sched, y)
        return ((sent, inbox) if sched.repeats > 1 else sent, acc), y

    start = jnp.zeros_like(micro[0])
    _, outs = lax.scan(tick, ((start, micro) if sched.repeats > 1 else start, blocks),
                       jnp.arange(sched.ticks))
    return collect_outputs(sched, outs, scatter=plan.scatter)


def stored_and_specs(fmodel: FunctionalModel, shape: MeshShape,
                     state_sharding: sharding.StateSharding, stored: Params | None,
                     specs: Params | None) -> tuple[Params, Params]:
    """The parameters' stored `ShapeDtypeStruct`s and `PartitionSpec`s on `shape`'s
    mesh: the Trainer's when given, else derived as the Trainer derives them."""
    if stored is None:  # as `Trainer.abstract_state`
        stored = sharding.stored_params(
            fmodel.abstract_params(), mesh_shape=shape, num_layers=fmodel.num_layers,
            rows=Schedule.of(shape, fmodel.num_layers).rows, mode=state_sharding)
    if specs is None:  # as `Trainer.specs`
        specs = sharding.state_specs(stored, None, mesh_shape=shape,
                                     num_layers=fmodel.num_layers, mode=state_sharding)[0]
    return stored, specs


def pipeline_loss(
    fmodel: FunctionalModel, shape: MeshShape, mesh: Mesh, *, global_batch: int,
    state_sharding: sharding.StateSharding = "fsdp", remat: Remat = "layer",
    compute_dtype: Any = None, stored: Params | None = None, specs: Params | None = None,
) -> Callable[[Params, Batch], jax.Array]:
    """``(params, batch, rng=None) -> loss`` computed pipelined on `mesh`; differentiable.

    `params` is the model's tree as stored on `shape`'s mesh (`meshscale.layout.padding`) or with
    the model's own shapes (padded here; the gradient then has the model's shapes).

    `stored` (the parameters' `jax.ShapeDtypeStruct`s as stored on this mesh) and `specs`
    (their `PartitionSpec` tree, every parameter) are the Trainer's; when None they are
    derived as the Trainer derives them (`sharding.stored_params`, `sharding.state_specs`
    for `state_sharding`, which is used for nothing else).

    `rng` is a step's key (`meshscale.model.rng`); layers then get per-example keys that do
    not depend on the mesh."""
    sched = Schedule.of(shape, fmodel.num_layers)
    stored, specs = stored_and_specs(fmodel, shape, state_sharding, stored, specs)
    rows = sharding.rows_spec(shape, global_batch)
    # The stored stack, padded to `sched.rows`, is split over pipe: a stage's slice is
    # its layer groups in running order (`meshscale.layout.stacking`).
    block_specs = specs[sharding.BLOCKS]
    plan = Plan(fmodel, sched, block_specs, remat, scatter=rows != P(DATA))

    def loss_fn(params: Params, batch: Batch, rng: jax.Array | None = None) -> jax.Array:
        def constrain(tree):
            return jax.tree.map(
                lambda x: lax.with_sharding_constraint(x, NamedSharding(mesh, rows)), tree)

        batch = constrain(batch)
        # As stored on this mesh (a model-shaped tree is padded).
        params = pad(params, stored, fmodel.num_layers)
        params = cast_floats(params, compute_dtype)  # float32 master weights stay outside
        model = fmodel.merge(params)
        h0 = constrain(model.embed(batch))
        side = constrain(layer_inputs(model, batch))
        keys = constrain(rng_lib.example_keys(rng, global_batch))
        per_example = jax.tree.map(lambda _: P(DATA), (side, keys))
        body = jax.shard_map(functools.partial(stages, plan), mesh=mesh,
                             in_specs=(block_specs, P(DATA), *per_example), out_specs=rows)
        h = body(params[sharding.BLOCKS], h0, side, keys)
        return mean_loss(model.head_loss(h, batch))

    return loss_fn
