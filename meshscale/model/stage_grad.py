"""One stage's call at one tick, with its backward pass written by hand.

Why. Autodiff through the tick loop hands each tick's stage-parameter gradient back as a
fresh stack-sized array, which the loop then adds to an accumulator: per device, the
stage's stacked parameter gradient existed two or three times over (the layer scan's
output, the loop's accumulator and, on pipelined meshes, the bubble ``cond``'s output;
measured with XLA's buffer assignment). Here the parameters enter a tick twice:

- ``blocks``: what the layers read, under ``stop_gradient`` (nothing accumulates for it);
- ``acc``: the same values, carried through the tick loop unchanged and never read.
  Its cotangent *is* the parameter gradient: the hand-written backward adds each layer's
  gradient into it at that layer's row (``dynamic_update_slice`` on the loop's carry, in
  place), so one stack of gradients exists per device, whatever the ticks, microbatches
  and rounds.

The backward pass of a tick runs the stage's layers in reverse, each layer's gradient from
its saved input (``remat="layer"``) or from inputs recomputed by one forward pass of the
stage (``remat="stage"``): the same arithmetic as autodiff of `stage_forward`, so losses
and gradients equal the one-device reference. FSDP gathers run inside each layer's call
(and its transpose, a reduce-scatter, inside its backward): a device holds one whole layer
at a time. ``remat="none"`` keeps autodiff (`meshscale.model.pipeline`).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from meshscale.layout import sharding, stacking
from meshscale.layout.mesh import DATA, PIPE
from meshscale.layout.schedule import PADDING
from meshscale.model import rng as rng_lib
from meshscale.model.contract import Params, call_layer


def _gather_over_data(stack: int, x: jax.Array, spec: Any) -> jax.Array:
    """One layer's whole leaf from its ``data`` shards (FSDP); as is when not split.

    `spec` is the stored leaf's spec, with `stack` leading stack axes
    (`meshscale.layout.stacking`); `x` is one layer of it (no stack axis)."""
    dim = sharding.data_dim(spec)
    return x if dim is None else lax.all_gather(x, DATA, axis=dim - stack, tiled=True)


def _pick(tree: Any, i: jax.Array) -> Any:
    """Every leaf of `tree` at index `i` of its leading axis."""
    return jax.tree.map(lambda x: lax.dynamic_index_in_dim(x, i, keepdims=False), tree)


def apply_layer(plan: Any, layer_params: Params, h: jax.Array, side: Any, keys: Any,
                layer: jax.Array) -> jax.Array:
    """One layer of the model on `h`: its parameters gathered over ``data`` (FSDP) just
    before the call, its dropout keys folded from the layer's index."""
    stack = len(stacking.stack_shape(plan.sched))
    layer_params = jax.tree.map(functools.partial(_gather_over_data, stack), layer_params,
                                plan.specs)
    return call_layer(plan.fmodel.merge_layer(layer_params), h, side,
                      rng_lib.layer_keys(keys, layer))


def group_of(plan: Any, blocks: Params, k: jax.Array) -> tuple[Params, jax.Array]:
    """``(params, layers)``: the layer group this stage runs in round `k` (`blocks`: the
    stage's stored slice, ``[slots, ...]``, or ``[repeats, slots, ...]`` on a circular
    mesh, `meshscale.layout.stacking`) and each slot's layer index (`PADDING`: empty)."""
    sched = plan.sched
    group = blocks if sched.contiguous else _pick(blocks, k)
    layer_of = jnp.asarray(sched.slot_layers)  # [pipe, repeats, slots]
    return group, lax.dynamic_index_in_dim(layer_of[lax.axis_index(PIPE)], k, keepdims=False)


def _padded(plan: Any) -> bool:
    return bool((plan.sched.slot_layers == PADDING).any())


def stage_forward(plan: Any, blocks: Params, h: jax.Array, side: Any, keys: Any,
                  k: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(out, inputs)``: the stage's layer group of round `k` on `h`, and every slot's
    input (``[slots, ...]``; an empty slot passes ``h`` on)."""
    group, layers = group_of(plan, blocks, k)

    def one_layer(h, xs):
        params, layer = xs
        if _padded(plan):
            out = lax.cond(layer != PADDING, functools.partial(apply_layer, plan),
                           lambda p, h, *_: h, params, h, side, keys, layer)
        else:
            out = apply_layer(plan, params, h, side, keys, layer)
        return out, h

    return lax.scan(one_layer, h, (group, layers))


def _split_side(side: Any) -> tuple[list, list, Any]:
    """`side`'s leaves as (floating ones, the rest, treedef): only floats get gradients."""
    leaves, treedef = jax.tree.flatten(side)
    floats = [jnp.issubdtype(x.dtype, jnp.floating) for x in leaves]
    return floats, leaves, treedef


def make_tick_call(plan: Any):
    """``(acc, blocks, x, side, keys, k, active) -> (y, acc)``: the stage on `x` on an
    active tick (`x` itself on a bubble tick), `acc` returned as it came; differentiable
    in `acc`, `x` and `side`'s floating leaves, the backward written by hand (module doc).
    """
    sched = plan.sched

    @jax.custom_vjp
    def tick_call(acc, blocks, x, side, keys, k, active):
        return forward(blocks, x, side, keys, k, active)[0], acc

    # One stage: no bubble, so the backward needs no branch. The forward keeps its branch:
    # without it XLA ran every layer's FSDP gather up front (1x8, 8 layers: 2437 MiB of
    # temporaries instead of 688, measured).
    every_tick = sched.pipe == 1

    def forward(blocks, x, side, keys, k, active):
        unused = jnp.broadcast_to(x, (sched.slots, *x.shape))  # a bubble's (never read)
        return lax.cond(active, lambda: stage_forward(plan, blocks, x, side, keys, k),
                        lambda: (x, unused))

    def fwd(acc, blocks, x, side, keys, k, active):
        y, inputs = forward(blocks, x, side, keys, k, active)
        saved = inputs if plan.remat == "layer" else None  # "stage": recomputed
        return (y, acc), (blocks, x, side, keys, k, active, saved)

    def bwd(res, cts):
        blocks, x, side, keys, k, active, inputs = res
        ct_y, ct_acc = cts
        if inputs is None:
            inputs = forward(blocks, x, side, keys, k, active)[1]
        group, layers = group_of(plan, blocks, k)
        floats, side_leaves, treedef = _split_side(side)

        def layer_vjp(params, h, side_f, ct_h, layer):
            def f(params, h, side_f):
                it = iter(side_f)
                whole = [next(it) if fl else x for fl, x in zip(floats, side_leaves, strict=True)]
                return apply_layer(plan, params, h, jax.tree.unflatten(treedef, whole),
                                   keys, layer)
            return jax.vjp(f, params, h, side_f)[1](ct_h)

        def skip(params, h, side_f, ct_h, layer):
            return (jax.tree.map(jnp.zeros_like, params), ct_h,
                    [jnp.zeros_like(s) for s in side_f])

        side_f = [x for fl, x in zip(floats, side_leaves, strict=True) if fl]

        def one_layer(carry, xs):
            ct_h, ct_acc, ct_side = carry
            j, layer, h_in = xs
            params = _pick(group, j)
            if every_tick and not _padded(plan):
                g_p, ct_h, g_side = layer_vjp(params, h_in, side_f, ct_h, layer)
            else:
                g_p, ct_h, g_side = lax.cond(active & (layer != PADDING), layer_vjp, skip,
                                             params, h_in, side_f, ct_h, layer)
            at = (j,) if sched.contiguous else (k, j)
            ct_acc = jax.tree.map(functools.partial(_add_at, at), ct_acc, g_p)
            return (ct_h, ct_acc, [a + b for a, b in zip(ct_side, g_side, strict=True)]), None

        zero_side = [jnp.zeros_like(s) for s in side_f]
        (ct_x, ct_acc, ct_side), _ = lax.scan(
            one_layer, (ct_y, ct_acc, zero_side),
            (jnp.arange(sched.slots), layers, inputs), reverse=True)
        it = iter(ct_side)
        ct_side_tree = jax.tree.unflatten(
            treedef, [next(it) if fl else None for fl in floats]) if side is not None else None
        return ct_acc, None, ct_x, ct_side_tree, None, None, None

    tick_call.defvjp(fwd, bwd)
    return tick_call


def _add_at(at: tuple, acc: jax.Array, g: jax.Array) -> jax.Array:
    """`acc` with `g` added at index `at` of its leading axes (in place on a loop carry)."""
    g = g.reshape((1,) * len(at) + g.shape)
    start = (*at, *([0] * (acc.ndim - len(at))))
    return lax.dynamic_update_slice(acc, lax.dynamic_slice(acc, start, g.shape) + g, start)
