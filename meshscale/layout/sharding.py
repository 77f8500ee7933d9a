"""Where every train-state leaf and every batch row lives on a ("pipe", "data") mesh.

The one place that decides placement: `Trainer.shardings`, the pipeline's `shard_map`
specs and the checkpoint's restore targets all ask `state_specs` / `rows_spec`, so the
rule cannot disagree with itself. Nothing here touches arrays or compiles; it maps shapes
to `PartitionSpec`s.

The rule, per leaf (a parameter or an optimizer-state leaf mirroring one):

- a **block leaf** (under ``blocks``, leading axis = the layer stack, padded with zero
  rows to the mesh's `Schedule.rows`, a multiple of ``pipe``) is split over ``pipe`` on
  that axis: stage ``s`` holds its consecutive layers (`meshscale.layout.schedule`); on a
  circular mesh the stack is two axes ``[repeats, pipe * slots]``, split over ``pipe``
  on the second (`meshscale.layout.stacking`), so a stage holds the groups it runs;
- any **other leaf** (embedding, head, final norm, and their optimizer moments) is split
  over ``pipe`` on its largest dimension that ``pipe`` divides, so it is never copied on
  every device of a pipeline;
- with `StateSharding` ``"zero1"`` optimizer-state leaves, and with ``"fsdp"`` parameters
  too, are also split over ``data`` on their largest remaining dimension that ``data``
  divides (ZeRO-1 / ZeRO-3, Rajbhandari et al. 2020);
- a leaf with no divisible dimension stays replicated over that axis (scalars such as
  the optimizer's step count, odd-sized leaves on ``data``): correct everywhere, just not
  split. Over ``pipe`` that would copy an embedding on every stage of an odd pipe width,
  so such a leaf is stored padded with zeros until one dimension divides
  (`padded_shape`, `meshscale.layout.padding`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, get_args

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

from meshscale.errors import InvalidArgument
from meshscale.layout import stacking
from meshscale.layout.mesh import DATA, PIPE, MeshShape

StateSharding = Literal["replicate", "zero1", "fsdp"]
STATE_SHARDINGS: tuple[str, ...] = get_args(StateSharding)
BLOCKS = stacking.BLOCKS
PAD_MIN_ELEMENTS = 2**18  # smaller non-block leaves are never padded (`padded_shape`)


def check_state_sharding(mode: str) -> StateSharding:
    if mode not in STATE_SHARDINGS:
        raise InvalidArgument(
            f"state_sharding must be one of {', '.join(STATE_SHARDINGS)}, got {mode!r}")
    return mode  # type: ignore[return-value]


def is_block_leaf(path: Sequence[Any], shape: Sequence[int], num_layers: int) -> bool:
    """A leaf of the layer stack: under ``blocks`` with a leading layer axis of at least
    `num_layers` rows (more on a mesh whose stack is padded, `Schedule.rows`)."""
    return stacking.in_blocks(path) and len(shape) >= 1 and shape[0] >= num_layers


def _split_largest(dims: list, shape: Sequence[int], axis: str | tuple[str, ...],
                   size: int, skip: int = 0) -> None:
    """Put `axis` on the largest free dimension of `shape` that `size` divides (in place),
    never one of the first `skip` (a stack's axes)."""
    if size == 1:
        return
    free = [i for i, d in enumerate(dims)
            if i >= skip and d is None and shape[i] % size == 0]
    if free:
        dims[max(free, key=lambda i: (shape[i], -i))] = axis


def leaf_spec(path: Sequence[Any], shape: Sequence[int], *, mesh_shape: MeshShape,
              num_layers: int, split_over_data: bool) -> P:
    """The `PartitionSpec` of one leaf (see the module docstring for the rule)."""
    shape = tuple(int(d) for d in shape)
    dims: list = [None] * len(shape)
    stack = stacking.axes(path, shape, num_layers)
    if stack:
        dims[stack - 1] = PIPE
    elif split_over_data:  # both axes on one dimension: a plain row gather where used
        _split_largest(dims, shape, (PIPE, DATA), mesh_shape.num_devices)
    if not any(dims):
        _split_largest(dims, shape, PIPE, mesh_shape.pipe)
    if split_over_data and not any(DATA in (d if isinstance(d, tuple) else (d,)) for d in dims):
        _split_largest(dims, shape, DATA, mesh_shape.data, skip=stack)
    return P(*dims)


def padded_shape(path: Sequence[Any], shape: Sequence[int], *, mesh_shape: MeshShape,
                 num_layers: int, rows: int, split_over_data: bool) -> tuple[int, ...]:
    """The shape a parameter leaf is stored with on `mesh_shape` (`meshscale.layout.padding`).

    A block leaf: the stack padded to `rows` (`Schedule.rows`, a multiple of ``pipe``),
    as ``[repeats, rows / repeats]`` on a circular mesh (`meshscale.layout.stacking`).
    Any other leaf of at least `PAD_MIN_ELEMENTS` no dimension of which ``pipe`` divides:
    its largest dimension padded to a multiple of the devices it is split over
    (``pipe``, or every device with `split_over_data`), so it is split, not copied on
    every stage. Else as it is (a small leaf's copies cost less than its padding).
    """
    shape = tuple(int(d) for d in shape)
    if is_block_leaf(path, shape, num_layers):
        if mesh_shape.repeats > 1:
            return (mesh_shape.repeats, rows // mesh_shape.repeats, *shape[1:])
        return (rows, *shape[1:])
    pipe = mesh_shape.pipe
    if (not shape or pipe == 1 or int(np.prod(shape)) < PAD_MIN_ELEMENTS
            or any(d % pipe == 0 for d in shape)):
        return shape
    size = mesh_shape.num_devices if split_over_data else pipe
    i = max(range(len(shape)), key=lambda i: (shape[i], -i))
    return (*shape[:i], -(-shape[i] // size) * size, *shape[i + 1:])


def padded_abstract(params: Any, *, mesh_shape: MeshShape, num_layers: int, rows: int,
                    split_over_data: bool) -> Any:
    """`padded_shape` over a tree of parameter `jax.ShapeDtypeStruct`s (or arrays)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: jax.ShapeDtypeStruct(
            padded_shape(path, np.shape(x), mesh_shape=mesh_shape, num_layers=num_layers,
                         rows=rows, split_over_data=split_over_data), x.dtype),
        params)


def tree_specs(tree: Any, *, mesh_shape: MeshShape, num_layers: int,
               split_over_data: bool) -> Any:
    """`leaf_spec` over a pytree of arrays or `ShapeDtypeStruct`s."""
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: leaf_spec(path, np.shape(leaf), mesh_shape=mesh_shape,
                                     num_layers=num_layers, split_over_data=split_over_data),
        tree)


def splits_over_data(mode: StateSharding) -> tuple[bool, bool]:
    """Whether `mode` splits (parameters, optimizer state) over ``data`` too: the one
    place that says what replicate, zero1 and fsdp mean."""
    check_state_sharding(mode)
    return mode == "fsdp", mode in ("zero1", "fsdp")


def stored_params(params: Any, *, mesh_shape: MeshShape, num_layers: int, rows: int,
                  mode: StateSharding) -> Any:
    """The parameters' shapes as stored on `mesh_shape`'s mesh under `mode`
    (`padded_abstract`)."""
    return padded_abstract(params, mesh_shape=mesh_shape, num_layers=num_layers, rows=rows,
                           split_over_data=splits_over_data(mode)[0])


def state_specs(params: Any, opt_state: Any, *, mesh_shape: MeshShape, num_layers: int,
                mode: StateSharding) -> tuple[Any, Any]:
    """(parameter specs, optimizer-state specs) for `mode`."""
    over_data = splits_over_data(mode)
    return (tree_specs(params, mesh_shape=mesh_shape, num_layers=num_layers,
                       split_over_data=over_data[0]),
            tree_specs(opt_state, mesh_shape=mesh_shape, num_layers=num_layers,
                       split_over_data=over_data[1]))


def data_dim(spec: P) -> int | None:
    """The dimension a spec splits over ``data`` (None when replicated over it)."""
    for i, entry in enumerate(spec):
        names = entry if isinstance(entry, tuple) else (entry,)
        if DATA in names:
            return i
    return None


def rows_spec(mesh_shape: MeshShape, global_batch: int) -> P:
    """How the input end and the output end (`embed`, `head_loss`) split the batch rows.

    Over every device (``("data", "pipe")``, data-major, so a pipeline column's rows stay
    together) when the rows divide evenly; else over ``data`` only, which computes the
    two ends once per pipeline stage.
    """
    if global_batch % mesh_shape.num_devices == 0:
        return P((DATA, PIPE))
    return P(DATA)
