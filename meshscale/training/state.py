"""`TrainState`: what training needs to go on, and how host values become one.

Its own module because every room that holds a state (the step, checkpoints, try-runs,
the elastic loop) needs the type, not the `Trainer`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
import optax

from meshscale.model.contract import Params


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    """Everything training needs to go on: step counter, parameters, optimizer state."""

    step: jax.Array
    params: Params
    opt_state: optax.OptState


def from_host(tree: Any, shardings: Any) -> Any:
    """Host values (the same on every process) placed with `shardings`.

    Across processes each one builds only its own shards: `jax.device_put` would first
    check, leaf by leaf, that every process holds the same values (an all-gather of the
    whole tree onto every host).
    """
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)
    return jax.tree.map(lambda x, s: jax.make_array_from_callback(
        np.shape(x), s, lambda index: np.asarray(x)[index]), tree, shardings)
