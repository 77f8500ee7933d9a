"""A stage's backward split in two: B, the input gradient, and W, the weight gradient.

Zero-bubble schedules (Qi et al. 2024) run them in different slots
(`meshscale.layout.schedule.SlotTable`): B sends its cotangent to the previous stage at
once, W fills a slot the stage would idle. B runs the stage forward again from its input
(``remat="layer"``: each layer's input) and the layers' input-gradient vjps in reverse,
keeping each layer's input and output cotangent; W reads those two and adds each layer's
parameter gradient into the accumulator at its row (in place on the loop's carry, as
`meshscale.model.stage_grad` does). Together they compute what `stage_grad`'s backward
computes, so losses and gradients stay exact. FSDP gathers run inside each layer's call
(W's transpose reduce-scatters the gradient over ``data``). Contiguous stages only
(``repeats == 1``).

Never: keeps more than one microbatch's layer inputs and cotangents per call; the caller
decides how many wait for their W.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from meshscale.layout.schedule import PADDING
from meshscale.model.contract import Params
from meshscale.model.stage_grad import _add_at, _pick, apply_layer, group_of, stage_forward


def input_grad(plan: Any, blocks: Params, x: jax.Array, side: Any, keys: Any,
               ct: jax.Array, active: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(d x, inputs, cts)`` of the stage on `x` with output cotangent `ct`: the
    cotangent for the previous stage, and each slot's layer input and output cotangent
    (``[slots, ...]``, for `weight_grad`). Inactive: `ct` passed on."""
    sched = plan.sched
    group, layers = group_of(plan, blocks, jnp.zeros((), jnp.int32))

    def run(x, ct):
        inputs = stage_forward(plan, blocks, x, side, keys, jnp.zeros((), jnp.int32))[1]

        def one_layer(ct_h, xs):
            j, layer, h_in = xs
            f = lambda h: apply_layer(plan, _pick(group, j), h, side, keys, layer)  # noqa
            ct_in = lax.cond(layer != PADDING, lambda: jax.vjp(f, h_in)[1](ct_h)[0],
                             lambda: ct_h)
            return ct_in, ct_h  # ct_h: the cotangent of this layer's output

        ct_x, cts = lax.scan(one_layer, ct, (jnp.arange(sched.slots), layers, inputs),
                             reverse=True)
        return ct_x, inputs, cts

    def skip(x, ct):  # what is kept is never read (the caller keeps nothing)
        return ct, jnp.broadcast_to(x, (sched.slots, *x.shape)), jnp.broadcast_to(
            ct, (sched.slots, *ct.shape))

    return lax.cond(active, run, skip, x, ct)


def weight_grad(plan: Any, acc: Params, blocks: Params, inputs: jax.Array, cts: jax.Array,
                side: Any, keys: Any, active: jax.Array) -> Params:
    """`acc` with the stage's parameter gradient added at each layer's row, from the
    layer inputs and output cotangents `input_grad` kept; `acc` as it is when inactive."""
    sched = plan.sched
    group, layers = group_of(plan, blocks, jnp.zeros((), jnp.int32))

    def run(acc):
        def one_layer(acc, xs):
            j, layer, h_in, ct_out = xs
            params = _pick(group, j)
            g = lambda p: apply_layer(plan, p, h_in, side, keys, layer)  # noqa: E731
            grads = lax.cond(layer != PADDING, lambda: jax.vjp(g, params)[1](ct_out)[0],
                             lambda: jax.tree.map(jnp.zeros_like, params))
            return jax.tree.map(functools.partial(_add_at, (j,)), acc, grads), None

        return lax.scan(one_layer, acc, (jnp.arange(sched.slots), layers, inputs, cts))[0]

    return lax.cond(active, run, lambda acc: acc, acc)
