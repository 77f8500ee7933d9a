"""The reshardable-model contract: what a Flax NNX model gives meshscale.

A reshardable model is three pieces around one stack of identical layers:

- ``embed(batch) -> h``: the input end (runs once per microbatch, on the first stage);
- ``blocks``: ``num_layers`` copies of one block, built with `stack_layers` so that every
  state leaf has a leading layer axis; one layer maps ``h -> h``. The layer axis is what
  the ``pipe`` mesh axis splits into consecutive stages;
- ``head_loss(h, batch) -> scalar``: the output end and the *mean* loss over the
  examples in ``batch`` (runs once per microbatch, on the last stage);
- ``loss(batch)``: the plain, unpipelined forward; the reference math every mesh must
  reproduce. `LayerStack` provides it.

All trainable state is `nnx.Param`; the forward must not mutate module state.
At the functional boundary meshscale holds parameters as a plain nested dict
(``nnx.State.to_pure_dict``), so checkpoints are plain Orbax trees.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
from flax import nnx

from meshscale.errors import ContractError

Batch = Any  # a pytree of arrays whose leading axis is the example axis
Params = dict  # nested dict of arrays; params["blocks"] has a leading layer axis


@runtime_checkable
class ReshardableModel(Protocol):
    num_layers: int
    blocks: nnx.Module

    def embed(self, batch: Batch) -> jax.Array: ...

    def head_loss(self, h: jax.Array, batch: Batch) -> jax.Array: ...

    def loss(self, batch: Batch) -> jax.Array: ...


def stack_layers(make_layer: Callable[[nnx.Rngs], nnx.Module], num_layers: int,
                 rngs: nnx.Rngs) -> nnx.Module:
    """`num_layers` independently initialised copies of `make_layer(rngs)`, stacked.

    Every state leaf gets a leading axis of size `num_layers` (`nnx.vmap` over split rngs).
    """

    @nnx.split_rngs(splits=num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(rngs: nnx.Rngs) -> nnx.Module:
        return make_layer(rngs)

    return create(rngs)


def run_layers(blocks: nnx.Module, h: jax.Array, *, remat: bool = False) -> jax.Array:
    """Apply the stacked layers of `blocks` to `h` in order (a `lax.scan` over layers)."""
    graphdef, state = nnx.split(blocks)

    def one_layer(h, layer_state):
        return nnx.merge(graphdef, layer_state)(h), None

    if remat:
        one_layer = jax.checkpoint(one_layer)
    h, _ = jax.lax.scan(one_layer, h, state)
    return h


class LayerStack(nnx.Module):
    """Base class giving `loss` from `embed`, `blocks` and `head_loss`."""

    def loss(self, batch: Batch) -> jax.Array:
        return self.head_loss(run_layers(self.blocks, self.embed(batch)), batch)


@dataclasses.dataclass(frozen=True)
class FunctionalModel:
    """A model split at the functional boundary: graph definitions + abstract templates.

    Holds no arrays (the templates are `jax.ShapeDtypeStruct`s), so it costs nothing to
    keep for a model of any size; parameters travel separately as plain dicts.
    """

    graphdef: Any
    template: nnx.State
    num_layers: int
    blocks_graphdef: Any
    blocks_template: nnx.State

    @classmethod
    def of(cls, model: nnx.Module) -> tuple[FunctionalModel, Params]:
        """Check the contract and split `model` (concrete or abstract) into
        (functional model, params dict); the dict holds whatever the model holds."""
        check_contract(model)
        graphdef, state = nnx.split(model, nnx.Param)
        blocks_graphdef, blocks_state = nnx.split(model.blocks, nnx.Param)
        fmodel = cls(graphdef, _abstract(state), int(model.num_layers), blocks_graphdef,
                     _abstract(blocks_state))
        return fmodel, nnx.to_pure_dict(state)

    def merge(self, params: Params) -> Any:
        """The module with `params` (any leading layer count in ``params["blocks"]``)."""
        return nnx.merge(self.graphdef, _filled(self.template, params))

    def merge_layer(self, layer_params: Params) -> nnx.Module:
        """One layer of the stack, from ``params["blocks"]`` sliced at one layer index."""
        return nnx.merge(self.blocks_graphdef, _filled(self.blocks_template, layer_params))

    def loss(self, params: Params, batch: Batch) -> jax.Array:
        """The reference loss: plain forward, no mesh."""
        return self.merge(params).loss(batch)

    def abstract_params(self) -> Params:
        """The parameter dict's shapes and dtypes (`jax.ShapeDtypeStruct` leaves)."""
        return nnx.to_pure_dict(self.template)

    def fingerprint(self) -> str:
        """A short hash of the parameter tree's names, shapes and dtypes.

        Two models with the same fingerprint can load each other's checkpoints.
        """
        leaves = jax.tree_util.tree_flatten_with_path(self.abstract_params())[0]
        text = ";".join(
            f"{jax.tree_util.keystr(path)}:{tuple(x.shape)}:{jnp.dtype(x.dtype)}"
            for path, x in leaves
        )
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _abstract(state: nnx.State) -> nnx.State:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(_shape(x), jnp.result_type(x.dtype)), state)


def _filled(template: nnx.State, params: Params) -> nnx.State:
    state = jax.tree.map(lambda x: x, template)
    nnx.replace_by_pure_dict(state, params)
    return state


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(x.shape) if hasattr(x, "shape") else tuple(jnp.shape(x))


def check_contract(model: Any) -> None:
    """Raise `ContractError` (one line, naming the fix) if `model` breaks the contract."""
    name = type(model).__name__
    if not isinstance(model, nnx.Module):
        raise ContractError(f"{name} is not a flax.nnx.Module: subclass meshscale.LayerStack")
    for method in ("embed", "head_loss", "loss"):
        if not callable(getattr(model, method, None)):
            raise ContractError(f"{name} has no method {method}(): see meshscale.model")
    layers = getattr(model, "num_layers", None)
    if not isinstance(layers, int) or layers < 1:
        raise ContractError(f"{name}.num_layers must be a positive int, got {layers!r}")
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nnx.Module):
        raise ContractError(
            f"{name}.blocks must be an nnx.Module built with meshscale.stack_layers")
    _, _, other = nnx.split(model, nnx.Param, ...)
    extra = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(other)[0]]
    if extra:
        raise ContractError(
            f"{name} holds non-Param state {extra[:3]}: keep only nnx.Param in the model")
    for path, leaf in jax.tree_util.tree_flatten_with_path(nnx.state(blocks, nnx.Param))[0]:
        if len(_shape(leaf)) < 1 or _shape(leaf)[0] != layers:
            raise ContractError(
                f"{name}.blocks leaf {jax.tree_util.keystr(path)} has shape {_shape(leaf)}, "
                f"expected a leading layer axis of {layers}: build blocks with stack_layers")
