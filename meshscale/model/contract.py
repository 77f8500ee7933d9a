"""The reshardable-model contract: what a Flax NNX model gives meshscale.

A reshardable model is three pieces around one stack of identical layers:

- ``embed(batch) -> h``: the input end;
- ``blocks``: ``num_layers`` copies of one block, built with `stack_layers` so that every
  state leaf has a leading layer axis; one layer maps ``h -> h``. The layer axis is what
  the ``pipe`` mesh axis splits into consecutive stages;
- ``head_loss(h, batch)``: the output end; the mean loss over ``batch``, or a pair
  ``(loss_sum, weight)`` whose ratio is the loss (e.g. summed token cross-entropy and the
  count of real tokens); it always sees the whole batch, so either is exact;
- ``layer_inputs(batch)`` (optional): per-example side inputs every layer receives as
  ``layer(h, side)`` (positions, segment ids, masks), leading axis the example axis;
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
from meshscale.layout.padding import cut
from meshscale.model import rng as rng_lib

Batch = Any  # a pytree of arrays whose leading axis is the example axis
Params = dict  # nested dict of arrays; params["blocks"] has a leading layer axis


@runtime_checkable
class ReshardableModel(Protocol):
    num_layers: int
    blocks: nnx.Module

    def embed(self, batch: Batch) -> jax.Array: ...

    def head_loss(self, h: jax.Array, batch: Batch) -> jax.Array: ...

    def loss(self, batch: Batch) -> jax.Array: ...


class LayerPattern(nnx.Module):
    """One period of a stack whose layers come in `kinds` kinds, repeating in order
    (local/global attention, dense/MoE): the unit `stack_layers` stacks and the
    pipeline splits, so every stage holds whole periods and runs them in layer order."""

    def __init__(self, make_layer: Callable[[nnx.Rngs, int], nnx.Module], kinds: int,
                 rngs: nnx.Rngs):
        self.kinds = kinds
        for kind in range(kinds):
            setattr(self, f"kind{kind}", make_layer(rngs, kind))

    def __call__(self, h: jax.Array, *side: Any, rng: jax.Array | None = None) -> jax.Array:
        for kind in range(self.kinds):
            keys = None if rng is None else jax.vmap(jax.random.fold_in, (0, None))(rng, kind)
            h = call_layer(getattr(self, f"kind{kind}"), h, side[0] if side else None, keys)
        return h


def stack_layers(make_layer: Callable[..., nnx.Module], num_layers: int, rngs: nnx.Rngs, *,
                 kinds: int = 1) -> nnx.Module:
    """`num_layers` independently initialised layers, stacked.

    Every state leaf gets a leading axis (`nnx.vmap` over split rngs). With ``kinds=1``
    the layers are copies of ``make_layer(rngs)``; with ``kinds=k`` layer ``i`` is
    ``make_layer(rngs, i % k)``, built as ``num_layers / k`` stacked `LayerPattern`s, so
    the leading axis (what ``pipe`` splits) counts periods of ``k`` layers.
    """
    if not isinstance(kinds, int) or kinds < 1 or num_layers % kinds:
        raise ContractError(f"stack_layers: kinds={kinds!r} must be a positive int dividing "
                            f"num_layers={num_layers}: the kinds repeat in whole periods")
    make = make_layer if kinds == 1 else (lambda r: LayerPattern(make_layer, kinds, r))

    @nnx.split_rngs(splits=num_layers // kinds)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(rngs: nnx.Rngs) -> nnx.Module:
        return make(rngs)

    return create(rngs)


def stack_length(model: Any) -> int:
    """How many stacked units ``blocks`` holds: layers, or periods of a `LayerPattern`."""
    return model.num_layers // getattr(model.blocks, "kinds", 1)


def call_layer(layer: nnx.Module, h: jax.Array, side: Any, rng: Any = None) -> jax.Array:
    """One layer applied as the contract says: ``layer(h)``, or ``layer(h, side)`` for a
    model with `layer_inputs`; with ``rng=keys`` (one key per example) when the trainer
    has an ``rng_seed`` (`meshscale.model.rng`)."""
    extra = {} if rng is None else {"rng": rng}
    return layer(h, **extra) if side is None else layer(h, side, **extra)


def run_layers(blocks: nnx.Module, h: jax.Array, side: Any = None, *, rng_data: Any = None,
               remat: bool = False) -> jax.Array:
    """Apply the stacked layers of `blocks` to `h` in order (a `lax.scan` over layers).

    `rng_data`: per-example key data (`meshscale.model.rng.example_keys`); layer ``i`` gets
    ``layer_keys(rng_data, i)``.
    """
    graphdef, state = nnx.split(blocks)
    count = jax.tree.leaves(state)[0].shape[0]

    def one_layer(h, xs):
        layer_state, index = xs
        layer = nnx.merge(graphdef, layer_state)
        return call_layer(layer, h, side, rng_lib.layer_keys(rng_data, index)), None

    if remat:
        one_layer = jax.checkpoint(one_layer)
    h, _ = jax.lax.scan(one_layer, h, (state, jnp.arange(count)))
    return h


def layer_inputs(model: Any, batch: Batch) -> Any:
    """What every layer receives besides ``h`` (``model.layer_inputs(batch)``), or None."""
    hook = getattr(model, "layer_inputs", None)
    return None if hook is None else hook(batch)


def cast_floats(params: Params, dtype: Any) -> Params:
    """`params` with floating leaves cast to `dtype` (the compute dtype); None: as is."""
    if dtype is None:
        return params
    return jax.tree.map(
        lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)


def mean_loss(out: Any) -> jax.Array:
    """`head_loss`'s result as the training loss, in float32: a mean as it is, a
    ``(loss_sum, weight)`` pair as ``loss_sum / weight`` (e.g. a token-weighted mean)."""
    if isinstance(out, tuple | list):
        if len(out) != 2:
            raise ContractError(f"head_loss returned {len(out)} values: return the mean loss, "
                                "or a (loss_sum, weight) pair")
        total, weight = out
        return jnp.asarray(total, jnp.float32) / jnp.asarray(weight, jnp.float32)
    return jnp.asarray(out, jnp.float32)


class LayerStack(nnx.Module):
    """Base class giving `loss` from `embed`, `blocks`, `head_loss` (and `layer_inputs`)."""

    def loss(self, batch: Batch, rng: jax.Array | None = None) -> jax.Array:
        """The plain forward's loss; `rng` (a step's key) turns on layer randomness."""
        rows = jax.tree.leaves(batch)[0].shape[0]
        h = run_layers(self.blocks, self.embed(batch), layer_inputs(self, batch),
                       rng_data=rng_lib.example_keys(rng, rows))
        return mean_loss(self.head_loss(h, batch))


@dataclasses.dataclass(frozen=True)
class FunctionalModel:
    """A model split at the functional boundary: graph definitions + abstract templates.

    Holds no arrays (the templates are `jax.ShapeDtypeStruct`s), so it costs nothing to
    keep for a model of any size; parameters travel separately as plain dicts.
    """

    graphdef: Any
    template: nnx.State
    num_layers: int  # stacked units: layers, or periods of a LayerPattern
    blocks_graphdef: Any
    blocks_template: nnx.State

    @classmethod
    def of(cls, model: nnx.Module) -> tuple[FunctionalModel, Params]:
        """Check the contract and split `model` (concrete or abstract) into
        (functional model, params dict); the dict holds whatever the model holds."""
        check_contract(model)
        graphdef, state = nnx.split(model, nnx.Param)
        blocks_graphdef, blocks_state = nnx.split(model.blocks, nnx.Param)
        fmodel = cls(graphdef, _abstract(state), stack_length(model), blocks_graphdef,
                     _abstract(blocks_state))
        return fmodel, nnx.to_pure_dict(state)

    def merge(self, params: Params) -> Any:
        """The module with `params`; leaves stored padded on a mesh (`meshscale.layout.padding`)
        are cut back to the model's shapes."""
        return nnx.merge(self.graphdef, _filled(self.template,
                                                cut(params, self.abstract_params())))

    def merge_layer(self, layer_params: Params) -> nnx.Module:
        """One layer of the stack, from ``params["blocks"]`` sliced at one layer index."""
        return nnx.merge(self.blocks_graphdef, _filled(self.blocks_template, layer_params))

    def loss(self, params: Params, batch: Batch, rng: jax.Array | None = None) -> jax.Array:
        """The reference loss: plain forward, no mesh (`rng`: a step's key, or None).

        `params` may come from any mesh, padded or not (`meshscale.layout.padding`)."""
        model = self.merge(params)
        return model.loss(batch) if rng is None else model.loss(batch, rng)

    def check_forward(self, batch_spec: Batch, name: str, *, rng: bool = False) -> None:
        """Trace embed, one layer and the head abstractly on `batch_spec` (nothing runs):
        signature, shape and dtype mistakes raise a `ContractError` before any compile."""
        params = self.abstract_params()
        rows = jax.tree.leaves(batch_spec)[0].shape[0]
        sowed: list[str] = []

        def stage(what, fn, *args):
            try:
                return fn(*args)
            except ContractError:
                raise
            except Exception as e:
                first = (str(e).strip().splitlines() or [""])[0][:300]
                raise ContractError(f"{name}: {what} failed ({type(e).__name__}: {first}): "
                                    f"{_CONTRACT_FIXES[what]}") from e

        def forward(params, batch):
            model = self.merge(params)
            h = stage("embed(batch)", model.embed, batch)
            side = stage("layer_inputs(batch)", layer_inputs, model, batch)
            for leaf in jax.tree.leaves((h, side)):
                if not jnp.ndim(leaf) or jnp.shape(leaf)[0] != rows:
                    raise ContractError(
                        f"{name}: embed / layer_inputs gave shape {jnp.shape(leaf)}: their "
                        f"outputs need the example axis ({rows}) first")
            layer = self.merge_layer(jax.tree.map(lambda x: x[0], params["blocks"]))
            keys = rng_lib.layer_keys(rng_lib.example_keys(jax.random.key(0), rows), 0) \
                if rng else None
            out = stage("one layer", call_layer, layer, h, side, keys)
            if jnp.shape(out) != jnp.shape(h) or jnp.result_type(out) != jnp.result_type(h):
                raise ContractError(
                    f"{name}: one layer maps h {jnp.shape(h)} {jnp.result_type(h)} to "
                    f"{jnp.shape(out)} {jnp.result_type(out)}: a layer must keep h's shape "
                    "and dtype")
            sowed.extend(jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(
                nnx.state(layer, nnx.Intermediate))[0])
            loss = stage("head_loss(h, batch)", lambda: mean_loss(model.head_loss(out, batch)))
            if jnp.ndim(loss):
                raise ContractError(f"{name}.head_loss returned shape {jnp.shape(loss)}: return "
                                    "a scalar mean, or a (loss_sum, weight) pair of scalars")
            return loss

        jax.eval_shape(forward, params, batch_spec)
        if sowed:
            raise ContractError(
                f"{name}: a layer records {sowed[:3]} with sow(), which a compiled pipeline "
                "drops: remove the sow calls (return what you need through head_loss)")

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


_CONTRACT_FIXES = {
    "embed(batch)": "embed takes the batch and returns the hidden state h",
    "layer_inputs(batch)": "layer_inputs takes the batch and returns per-example arrays",
    "one layer": "a layer is called as layer(h), or layer(h, side) where side = "
                 "model.layer_inputs(batch), plus rng=keys when the trainer has an "
                 "rng_seed; make __call__ take exactly that",
    "head_loss(h, batch)": "head_loss takes (h, batch) and returns the mean loss or a "
                           "(loss_sum, weight) pair",
}


def _abstract(state: nnx.State) -> nnx.State:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(_shape(x), jnp.result_type(x.dtype)), state)


def _filled(template: nnx.State, params: Params) -> nnx.State:
    state = jax.tree.map(lambda x: x, template)
    nnx.replace_by_pure_dict(state, params)
    return state


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(x.shape) if hasattr(x, "shape") else tuple(jnp.shape(x))


_SHARDING_METADATA = ("out_sharding", "sharding", "sharding_names")


def check_contract(model: Any) -> None:
    """Raise `ContractError` (one line, naming the fix) if `model` breaks the contract."""
    name = type(model).__name__
    if not isinstance(model, nnx.Module):
        raise ContractError(f"{name} is not a flax.nnx.Module: subclass meshscale.LayerStack")
    for method in ("embed", "head_loss", "loss"):
        if not callable(getattr(model, method, None)):
            raise ContractError(f"{name} has no method {method}(): see meshscale.model.contract")
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
    annotated = [jax.tree_util.keystr(p) for p, v in jax.tree_util.tree_flatten_with_path(
        nnx.state(model, nnx.Param), is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
        if isinstance(v, nnx.Variable) and any(
            v.get_metadata().get(k) for k in _SHARDING_METADATA)]
    if annotated:
        raise ContractError(
            f"{name} carries sharding annotations on {annotated[:3]}: meshscale decides where "
            "every leaf lives (Trainer(state_sharding=...)); build the model without "
            "nnx.with_partitioning / out_sharding")
    kinds = getattr(blocks, "kinds", 1)
    if layers % kinds:
        raise ContractError(f"{name}.num_layers={layers} is not a whole number of periods of "
                            f"{kinds} layer kinds: make it a multiple of {kinds}")
    for path, leaf in jax.tree_util.tree_flatten_with_path(nnx.state(blocks, nnx.Param))[0]:
        if len(_shape(leaf)) < 1 or _shape(leaf)[0] != layers // kinds:
            raise ContractError(
                f"{name}.blocks leaf {jax.tree_util.keystr(path)} has shape {_shape(leaf)}, "
                f"expected a leading layer axis of {layers // kinds}: build blocks with "
                "stack_layers")
