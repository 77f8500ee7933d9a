"""Stored shapes and model shapes: the zero padding that lets every leaf split evenly.

JAX splits an array axis over a mesh axis only when the axis size divides it, and a mesh
of any pipe width must still split every large leaf. So a leaf is stored padded with
zeros where that would fail (the shapes: `meshscale.layout.sharding.padded_abstract`): the layer
stack to the mesh's `Schedule.rows`, and a leaf no dimension of which the pipe width
divides (Llama-3's 128256 x 4096 embedding on 5 or 7 stages) on its largest dimension.
`pad` and `cut` move a tree between the two, and refuse a tree that is neither. The
model only ever sees the cut (`FunctionalModel.merge`), so the padding's gradient is
zero and it stays zero through training.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from meshscale.errors import ContractError
from meshscale.layout import stacking


def _fit(tree: Any, shapes: Any, *, grow: bool, fix: str, num_layers: int | None) -> Any:
    def one(path, x, target):
        want, have = tuple(target.shape), tuple(x.shape)
        if have == want:
            return x
        layers = want[0] if num_layers is None and want else num_layers
        n_have = stacking.axes(path, have, layers) if layers else 0
        n_want = stacking.axes(path, want, layers) if layers else 0
        if n_have and n_want:  # a stack, in either form: fit its rows in layer order
            x = x.reshape(stacking.flat_shape(have, n_have))
            return _fit_dims(path, x, stacking.flat_shape(want, n_want), grow, fix).reshape(want)
        return _fit_dims(path, x, want, grow, fix)

    return jax.tree_util.tree_map_with_path(one, tree, shapes)


def _fit_dims(path, x, want: tuple[int, ...], grow: bool, fix: str) -> Any:
    have = tuple(x.shape)
    if have == want:
        return x
    wrong = len(have) != len(want) or any((h < w) != grow and h != w
                                          for h, w in zip(have, want, strict=False))
    if wrong:
        raise ContractError(
            f"parameter {jax.tree_util.keystr(path)} has shape {have}, expected {want} "
            f"or its padded form: {fix}")
    if grow:
        return jnp.pad(x, [(0, w - h) for h, w in zip(have, want, strict=True)])
    return x[tuple(slice(0, w) for w in want)]


def pad(tree: Any, shapes: Any, num_layers: int) -> Any:
    """`tree`'s leaves (arrays, traced or not) zero-padded to `shapes`' leaves' shapes
    (arrays or `jax.ShapeDtypeStruct`s); a leaf already that shape is returned as it is.
    Block leaves of the `num_layers`-layer stack are fitted in layer order, whichever of
    its forms each side has (`meshscale.layout.stacking`). Refuses (`ContractError`) a
    leaf larger than its target in any dimension: it is not this model's, or it is
    stored for another mesh."""
    return _fit(tree, shapes, grow=True, num_layers=num_layers,
                fix="pass this model's parameters, or a state placed on this mesh "
                    "(Trainer.place)")


def cut(tree: Any, shapes: Any) -> Any:
    """`tree`'s leaves cut back to `shapes`, the model's own (the padding dropped; a
    circular stack flattened to its layer axis); refuses a leaf smaller than its target
    (`ContractError`): it is not this model's."""
    return _fit(tree, shapes, grow=False, num_layers=None, fix="pass this model's parameters")
