"""Stored shapes and model shapes: the zero padding that lets every leaf split evenly.

JAX splits an array axis over a mesh axis only when the axis size divides it, and a mesh
of any pipe width must still split every large leaf. So a leaf is stored padded with
zeros where that would fail (the shapes: `meshscale.sharding.padded_abstract`): the layer
stack to the mesh's `Schedule.rows`, and a leaf no dimension of which the pipe width
divides (Llama-3's 128256 x 4096 embedding on 5 or 7 stages) on its largest dimension.
`fit` moves a tree between the two. The model only ever sees the cut (`FunctionalModel
.merge`), so the padding's gradient is zero and it stays zero through training.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def fit(tree: Any, shapes: Any) -> Any:
    """`tree`'s leaves (arrays, traced or not) cut or zero-padded, dimension by dimension,
    to the shapes of `shapes`' leaves (arrays or `jax.ShapeDtypeStruct`s); a leaf whose
    shape already matches is returned as it is."""
    def one(x, target):
        want = tuple(target.shape)
        if tuple(x.shape) == want:
            return x
        x = x[tuple(slice(0, min(have, w)) for have, w in zip(x.shape, want, strict=True))]
        return jnp.pad(x, [(0, w - have) for have, w in zip(x.shape, want, strict=True)])

    return jax.tree.map(one, tree, shapes)
