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


def _fit(tree: Any, shapes: Any, *, grow: bool, fix: str) -> Any:
    def one(path, x, target):
        want, have = tuple(target.shape), tuple(x.shape)
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

    return jax.tree_util.tree_map_with_path(one, tree, shapes)


def pad(tree: Any, shapes: Any) -> Any:
    """`tree`'s leaves (arrays, traced or not) zero-padded to `shapes`' leaves' shapes
    (arrays or `jax.ShapeDtypeStruct`s); a leaf already that shape is returned as it is.
    Refuses (`ContractError`) a leaf larger than its target in any dimension: it is not
    this model's, or it is stored for another mesh."""
    return _fit(tree, shapes, grow=True, fix="pass this model's parameters, or a state "
                "placed on this mesh (Trainer.place)")


def cut(tree: Any, shapes: Any) -> Any:
    """`tree`'s leaves cut back to `shapes` (the padding dropped); refuses a leaf smaller
    than its target (`ContractError`): it is not this model's."""
    return _fit(tree, shapes, grow=False, fix="pass this model's parameters")
