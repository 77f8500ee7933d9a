"""The train state as a plain tree of dicts: the form Orbax stores and any reader loads.

Optimizer NamedTuples, tuples and dataclasses become dicts keyed by field name or index
(``opt_state["0"]["mu"]``), so a checkpoint needs no meshscale to read; `tree_to_state`
rebuilds the exact structure from a template. Pure structure: nothing here touches
devices or files.
"""

from __future__ import annotations

import hashlib
from typing import Any

import jax
import numpy as np


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):  # DictKey / FlattenedIndexKey, GetAttrKey, SequenceKey
        if hasattr(key, attr):
            return str(getattr(key, attr))
    raise TypeError(f"unsupported pytree key {key!r}")


def state_to_tree(state: Any) -> dict:
    """`state` as nested dicts keyed by field name or index: what Orbax stores.

    Every leaf keeps its pytree path, so `tree_to_state` rebuilds the exact original
    structure (NamedTuples, tuples, dataclasses) from a template.
    """
    tree: dict = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        *parents, last = (_key_name(k) for k in path)
        node = tree
        for name in parents:
            node = node.setdefault(name, {})
        if last in node:
            raise ValueError(f"two leaves map to {jax.tree_util.keystr(path)}")
        node[last] = leaf
    return tree


def tree_to_state(tree: dict, template: Any) -> Any:
    """The inverse of `state_to_tree`: `tree`'s leaves in `template`'s structure."""

    def lookup(path, _):
        node = tree
        for key in path:
            node = node[_key_name(key)]
        return node

    return jax.tree_util.tree_map_with_path(lookup, template)


def tree_fingerprint(tree: Any) -> str:
    """A short hash of `tree`'s leaf paths, shapes and dtypes (as Orbax stores them)."""
    leaves = jax.tree_util.tree_flatten_with_path(state_to_tree(tree))[0]
    text = ";".join(f"{jax.tree_util.keystr(p)}:{tuple(np.shape(x))}:{np.dtype(x.dtype)}"
                    for p, x in leaves)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
