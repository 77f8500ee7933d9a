"""Moving arrays onto another mesh by copying only what each target device lacks.

`jax.device_put(x, new_sharding)` reshards through a general path; measured on 8
simulated CPU devices (400 MB of params + Adam state, 2x4 -> 4x2) it took 2.4x as long as
copying, shard by shard, a slice of a source shard that already holds the target
shard's data, preferring one on the same device (no transfer; a replicated leaf that
stays on its device is not copied at all). When no single source shard holds a target
shard (a leaf split over both mesh axes moving to a mesh that splits it less), the
target shard is assembled on its device from the pieces of the source shards that tile
it. Arrays that span processes go through `jax.device_put`. (On jax 0.10 `device_put`
between meshes listing the same devices in another order aborted the process once in a
full test run, so single-process moves never take that path.)

Never changes values: the result is bit-identical, only its placement differs.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Sharding

from meshscale.layout import stacking

Index = tuple[slice, ...]


def _bounds(index: Index, shape: tuple[int, ...]) -> list[tuple[int, int]]:
    return [(s.start or 0, n if s.stop is None else s.stop)
            for s, n in zip(index, shape, strict=True)]


def _inside(outer: Index, inner: Index, shape: tuple[int, ...]) -> Index | None:
    """`inner` relative to `outer` when `outer` covers it, else None."""
    local = []
    for (o0, o1), (i0, i1) in zip(_bounds(outer, shape), _bounds(inner, shape), strict=True):
        if not (o0 <= i0 and i1 <= o1):
            return None
        local.append(slice(i0 - o0, i1 - o0))
    return tuple(local)


def _assemble(x: jax.Array, index: Index, device: jax.Device) -> jax.Array:
    """Block `index` of `x` on `device`, from the pieces of the source shards tiling it."""
    want = _bounds(index, x.shape)
    pieces: dict[tuple[int, ...], jax.Array] = {}
    for shard in x.addressable_shards:
        have = _bounds(shard.index, x.shape)
        cut = [(max(h0, w0), min(h1, w1)) for (h0, h1), (w0, w1) in zip(have, want,
                                                                          strict=True)]
        if any(lo >= hi for lo, hi in cut):
            continue
        key = tuple(lo for lo, _ in cut)
        if key in pieces and shard.device != device:
            continue  # a copy of this piece that is already on the device wins
        local = tuple(slice(lo - h0, hi - h0) for (lo, hi), (h0, _) in zip(cut, have,
                                                                           strict=True))
        pieces[key] = jax.device_put(shard.data[local], device)
    starts = [sorted({key[d] for key in pieces}) for d in range(x.ndim)]

    def block(prefix: tuple[int, ...]) -> jax.Array:
        d = len(prefix)
        if d == x.ndim:
            return pieces[prefix]
        return jnp.concatenate([block((*prefix, s)) for s in starts[d]], axis=d)

    assert len(pieces) == len(list(itertools.product(*starts))), "shards do not tile"
    return block(())


def _resized(x: jax.Array, shape: tuple[int, ...], sharding: Sharding) -> jax.Array:
    """`x` cut or zero-padded to `shape`, dimension by dimension (a leaf moving to a
    mesh that stores it with other padding, `meshscale.layout.padding`). Each target shard is
    the part of `x` it overlaps, from the source shards, padded with zeros on its device.
    """
    if not (x.is_fully_addressable and sharding.is_fully_addressable):
        raise ValueError(f"cannot re-pad an array spanning processes in memory "
                         f"({x.shape} -> {shape}): restore it from a checkpoint")
    pieces = []
    for device, index in sharding.addressable_devices_indices_map(shape).items():
        want = _bounds(index, shape)
        have = [(lo, max(lo, min(hi, n))) for (lo, hi), n in zip(want, x.shape, strict=True)]
        size = tuple(hi - lo for lo, hi in want)
        if any(lo == hi for lo, hi in have):  # all padding: zeros, made on the device
            pieces.append(jnp.zeros(size, x.dtype, device=device))
            continue
        piece = _piece(x, tuple(slice(lo, hi) for lo, hi in have), device)
        if piece.shape != size:
            piece = jnp.pad(piece, [(0, s - p) for s, p in zip(size, piece.shape, strict=True)])
        pieces.append(piece)
    return jax.make_array_from_single_device_arrays(shape, sharding, pieces)


def _piece(x: jax.Array, index: Index, device: jax.Device) -> jax.Array:
    """Block `index` of `x` on `device`: a slice of one source shard holding it (the one
    on `device` if any), else assembled from the shards tiling it."""
    source, local = None, None
    for shard in x.addressable_shards:
        inside = _inside(shard.index, index, x.shape)
        if inside is not None and (source is None or shard.device == device):
            source, local = shard, inside
            if shard.device == device:
                break
    if source is None:
        return _assemble(x, index, device)
    whole = all(s == slice(0, n) for s, n in zip(local, source.data.shape, strict=True))
    piece = source.data if whole else source.data[local]
    return piece if source.device == device else jax.device_put(piece, device)


def _layer_rows(x: jax.Array, n_axes: int, lo: int, hi: int, rest: Index,
                device: jax.Device) -> jax.Array:
    """Rows ``[lo, hi)`` of the layer stack `x` in layer order (its `n_axes` stack axes
    read as one, `meshscale.layout.stacking`), trailing dimensions `rest`, on `device`;
    rows past the stack are zeros."""
    per = x.shape[1] if n_axes == 2 else x.shape[0]  # rows per index of the first axis
    total = x.shape[0] * per if n_axes == 2 else per
    pieces, row = [], lo
    while row < min(hi, total):  # one run per index of the first axis
        k, a = divmod(row, per)
        b = min(a + hi - row, per)
        index = ((slice(k, k + 1), slice(a, b)) if n_axes == 2 else (slice(a, b),)) + rest
        piece = _piece(x, index, device)
        pieces.append(piece.reshape(b - a, *piece.shape[n_axes:]))
        row += b - a
    if hi > total:
        width = tuple(s.stop - s.start for s in rest)
        pieces.append(jnp.zeros((hi - max(lo, total), *width), x.dtype, device=device))
    return pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces)


def _restacked(x: jax.Array, shape: tuple[int, ...], sharding: Sharding,
               axes: tuple[int, int]) -> jax.Array:
    """The layer stack `x` (`axes[0]` stack axes) as `shape` (`axes[1]` stack axes) with
    `sharding`: each target shard gathered row run by row run from the source shards, in
    layer order, zero rows cut or added (another mesh's padding or stack form)."""
    if not (x.is_fully_addressable and sharding.is_fully_addressable):
        raise ValueError(f"cannot re-stack an array spanning processes in memory "
                         f"({x.shape} -> {shape}): restore it from a checkpoint")
    n_src, n_dst = axes
    rest_shape = shape[n_dst:]
    if tuple(x.shape[n_src:]) != tuple(rest_shape):
        raise ValueError(f"cannot move layer stack {x.shape} to {shape}: a layer's shape "
                         "differs")
    pieces = []
    for device, index in sharding.addressable_devices_indices_map(shape).items():
        bounds = _bounds(index, shape)
        rest = tuple(slice(lo, hi) for lo, hi in bounds[n_dst:])
        if n_dst == 1:
            (lo, hi), = bounds[:1]
            piece = _layer_rows(x, n_src, lo, hi, rest, device)
        else:
            (k0, k1), (j0, j1) = bounds[:2]
            per = shape[1]
            piece = jnp.stack([_layer_rows(x, n_src, k * per + j0, k * per + j1, rest, device)
                               for k in range(k0, k1)])
        pieces.append(piece)
    return jax.make_array_from_single_device_arrays(shape, sharding, pieces)


def move(x: jax.Array, target: Sharding | jax.ShapeDtypeStruct,
         stack: tuple[int, int] | None = None) -> jax.Array:
    """`x` with `target`'s sharding, built from slices of its own shards.

    `target` is a sharding, or a `jax.ShapeDtypeStruct` with one whose shape may differ
    from `x`'s by zero padding (`_resized`: padding is cut or added). For a layer stack,
    `stack` gives its stack axes in `x` and in `target` (`meshscale.layout.stacking`):
    its rows are moved in layer order whatever form either side has (`_restacked`)."""
    sharding = getattr(target, "sharding", target)
    if isinstance(target, jax.ShapeDtypeStruct) and tuple(target.shape) != x.shape:
        if stack is not None and min(stack) >= 1:
            return _restacked(x, tuple(target.shape), sharding, stack)
        if len(target.shape) != x.ndim:
            raise ValueError(f"cannot move shape {x.shape} to {target.shape}: padding "
                             "changes sizes, never the rank")
        return _resized(x, tuple(target.shape), sharding)
    if x.sharding == sharding:
        return x
    if not (x.is_fully_addressable and sharding.is_fully_addressable):
        return jax.device_put(x, sharding)
    pieces = [_piece(x, index, device) for device, index in
              sharding.addressable_devices_indices_map(x.shape).items()]
    return jax.make_array_from_single_device_arrays(x.shape, sharding, pieces)


def move_tree(tree, targets, num_layers: int | None = None, then=None):
    """`move` over matching pytrees of arrays and shardings (or `ShapeDtypeStruct`s);
    with `num_layers`, the layer stacks of a `num_layers`-layer model in layer order
    (`meshscale.layout.stacking`). `then` (e.g. `jnp.copy`) runs on each moved leaf
    before the next is moved."""
    then = then or (lambda x: x)
    if num_layers is None:
        return jax.tree.map(lambda x, t: then(move(x, t)), tree, targets)
    axes = lambda path, x: stacking.axes(path, np.shape(x), num_layers)
    return jax.tree_util.tree_map_with_path(
        lambda path, x, t: then(move(x, t, (axes(path, x), axes(path, t)))), tree, targets)
