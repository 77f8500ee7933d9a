"""The layer stack's two stored forms, and the moves between them.

A block leaf (a parameter of the layer stack, or an optimizer leaf mirroring one) is
stored layer-major, padded with zero rows to the mesh's `Schedule.rows`
(`meshscale.layout.padding`), in one of two forms:

- **one layer axis** ``[rows, ...]``, split over ``pipe`` on it: stage ``s`` holds rows
  ``[s r c, (s + 1) r c)``. A GPipe stage's slice is exactly the group it runs;
- **circular** (``repeats > 1``): ``[repeats, pipe * slots, ...]``, the same rows cut every
  ``pipe * slots`` (row ``k`` holds round ``k``'s groups, stage after stage), split over
  ``pipe`` on the second axis: stage ``s`` holds ``[repeats, slots]``, the groups
  ``k pipe + s`` it runs in round ``k`` (MaxText's ``[repeats, stages, layers]``).

Why two. With one axis a circular stage stores groups ``s r .. s r + r - 1`` but runs
groups ``k p + s``, and the step had to regroup them: a copy of the stage's parameters
and of their gradient alive through the step (Llama-3-8B shapes on ``4x1/m8/r2``: 82.0
GB per device against 56.4 for GPipe, measured). Stored circularly, the stage holds what
it runs. Flattening the two axes gives the layer order back, and checkpoints hold that
form (`layer_major`): one layer axis, so any mesh restores any other's steps.

`axes` counts a stored leaf's stack axes (0: not a block leaf); `meshscale.layout.padding`
and `meshscale.layout.placement.move` convert between the forms leaf by leaf.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from meshscale.layout.schedule import Schedule

BLOCKS = "blocks"


def in_blocks(path: Sequence[Any]) -> bool:
    return any(getattr(k, "key", None) == BLOCKS for k in path)


def stack_shape(sched: Schedule) -> tuple[int, ...]:
    """The leading axes of a block leaf stored on `sched`'s mesh: ``(rows,)``, or
    ``(repeats, pipe * slots)`` on a circular one."""
    if sched.contiguous:
        return (sched.rows,)
    return (sched.repeats, sched.rows // sched.repeats)


def axes(path: Sequence[Any], shape: Sequence[int], num_layers: int) -> int:
    """How many leading axes of a stored leaf are the layer stack: 1 (one layer axis of
    at least `num_layers` rows), 2 (the circular form: ``repeats < num_layers`` rows of
    ``pipe * slots``, together at least `num_layers`) or 0 (not a block leaf: outside
    ``blocks``, or a placeholder such as a factored optimizer's ``(1,)``)."""
    if not in_blocks(path) or not shape:
        return 0
    if shape[0] >= num_layers:
        return 1
    return 2 if len(shape) >= 2 and shape[0] * shape[1] >= num_layers else 0


def flat_shape(shape: Sequence[int], n_axes: int) -> tuple[int, ...]:
    """`shape` with its `n_axes` stack axes as one (the layer-major form)."""
    if n_axes <= 1:
        return tuple(shape)
    return (int(np.prod(shape[:n_axes])), *shape[n_axes:])


def flat_spec(spec: P, n_axes: int) -> P:
    """A circular block leaf's spec (``(None, "pipe", ...)``) for its layer-major form
    (``("pipe", ...)``): the same split of every other dimension."""
    if n_axes <= 1:
        return spec
    entries = list(spec) + [None] * (n_axes - len(spec))
    return P(*entries[n_axes - 1:])


def layer_major_target(target: jax.ShapeDtypeStruct, n_axes: int) -> jax.ShapeDtypeStruct:
    """Where a circular block leaf is read from, or written to, a checkpoint: its
    layer-major form on the same mesh (``target`` itself for any other leaf)."""
    if n_axes <= 1:
        return target
    sharding = target.sharding
    return jax.ShapeDtypeStruct(flat_shape(target.shape, n_axes), target.dtype,
                                sharding=NamedSharding(sharding.mesh,
                                                       flat_spec(sharding.spec, n_axes)))


@functools.cache
def _reshaper(shape: tuple[int, ...], sharding: NamedSharding, donate: bool):
    return jax.jit(lambda x: x.reshape(shape), out_shardings=sharding,
                   donate_argnums=(0,) if donate else ())


def reshaped(x: jax.Array, target: jax.ShapeDtypeStruct, *, donate: bool) -> jax.Array:
    """`x` reshaped to `target` (same elements, same order) with `target`'s sharding: one
    small compiled program per leaf shape, so arrays spanning processes work too. With
    `donate`, `x`'s buffers are freed as it runs: one leaf at a time, a tree converted
    leaf by leaf holds one leaf more than itself at most."""
    if tuple(x.shape) == tuple(target.shape) and x.sharding == target.sharding:
        return x
    return _reshaper(tuple(target.shape), target.sharding, donate)(x)


def tree_axes(tree: Any, num_layers: int) -> Any:
    """`axes` of every leaf of a stored tree (arrays or `ShapeDtypeStruct`s)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: axes(path, np.shape(x), num_layers), tree)


def layer_major(tree: Any, num_layers: int) -> Any:
    """`tree` (arrays on one mesh) with every circular stack as one layer axis on the same
    mesh (a copy of those leaves; the others as they are): what a checkpoint holds."""
    def one(x, n):
        return x if n <= 1 else reshaped(x, layer_major_target(
            jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), n), donate=False)

    return jax.tree.map(one, tree, tree_axes(tree, num_layers))


def layer_major_targets(targets: Any, num_layers: int) -> Any:
    """`targets` (`ShapeDtypeStruct`s with shardings) in their layer-major form: what a
    checkpoint is read into before `restacked`."""
    return jax.tree.map(layer_major_target, targets, tree_axes(targets, num_layers))


def restacked(tree: Any, targets: Any) -> Any:
    """`tree` (read in its layer-major form) in `targets`' stored form, leaf by leaf, each
    source leaf donated as it is converted (one leaf more than the tree at most)."""
    return jax.tree.map(lambda x, t: reshaped(x, t, donate=True), tree, targets)
