"""Checksums and the finiteness check: the same on every mesh and padding, changed by any
damage, and never fooled by a nan or inf."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from meshscale.models.mlp import MLPConfig, ResidualMLP

from meshscale import MeshShape, Trainer
from meshscale.store import integrity
from meshscale.store.state_tree import state_to_tree, tree_to_state
from tests.helpers import random_host_state

SMALL = MLPConfig(num_layers=8, features=8, hidden=16, inputs=4, outputs=2)
SHAPE = MeshShape(2, 4)
KERNEL = "params/blocks/up/kernel"


@pytest.fixture(scope="module")
def trainer():
    return Trainer(ResidualMLP(SMALL, rngs=nnx.Rngs(0)), optax.adam(1e-3), global_batch=8)


def on_mesh(trainer, host, shape=SHAPE):
    return jax.device_put(host, trainer.shardings(shape))


def with_leaf(host, path, change):
    """`host` (a TrainState of numpy arrays) with the leaf at `path` (a digest key)
    replaced by `change(copy of that leaf)`."""
    def one(p, x):
        return change(x.copy()) if "/".join(str(k.key) for k in p) == path else x
    return tree_to_state(jax.tree_util.tree_map_with_path(one, state_to_tree(host)), host)


def differing(a, b):
    return sorted(k for k in a if a[k] != b[k])


def test_digests_are_the_same_on_every_mesh_and_stack_padding(trainer):
    assert trainer.rows(MeshShape(3, 2)) == 9  # 8 layers on 3 stages: one zero row
    shapes = [MeshShape(2, 4), MeshShape(4, 2), MeshShape(3, 2), MeshShape(1, 1)]
    results = [integrity.check(on_mesh(trainer, random_host_state(trainer, s, seed=1), s))
               for s in shapes]
    assert all(r == results[0] for r in results)
    digests, finite = results[0]
    assert finite
    assert set(digests) == {"/".join(str(k.key) for k in p) for p, _ in
                            jax.tree_util.tree_flatten_with_path(state_to_tree(
                                trainer.abstract_state()))[0]}  # Orbax's keys
    assert {"step", KERNEL, "opt_state/0/mu/blocks/up/kernel"} <= set(digests)
    assert len(set(digests.values())) == len(digests)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_zero_padding_at_the_end_of_any_axis_leaves_the_digest_unchanged(devices, axis):
    mesh = jax.make_mesh((2, 4), ("pipe", "data"))
    x = np.random.default_rng(0).standard_normal((4, 6, 8)).astype(np.float32)
    widths = [(0, 0)] * 3
    widths[axis] = (0, 4)
    placed = [jax.device_put(a, NamedSharding(mesh, spec)) for a, spec in
              [(x, P("pipe", None, "data")), (np.pad(x, widths), P(None, "pipe", "data")),
               (np.pad(x, widths), P())]]
    assert len({integrity.check({"w": a})[0]["w"] for a in placed}) == 1


def test_padding_of_negative_zeros_counts_as_zeros():
    """-0.0 digests as +0.0: padding written as -0.0 (a negated zero update) must not
    make a good checkpoint fail its check on a mesh with other padding."""
    x = np.random.default_rng(1).standard_normal((3, 5)).astype(np.float32)
    negative = np.pad(x, [(0, 2), (0, 0)], constant_values=-0.0)
    assert np.signbit(negative[3:]).all()
    assert integrity.check({"w": jnp.asarray(negative)}) == integrity.check({"w": jnp.asarray(x)})


def test_one_flipped_bit_changes_that_leaf_and_no_other(trainer):
    host = random_host_state(trainer, SHAPE)
    before, _ = integrity.check(on_mesh(trainer, host))
    for index, bit in [((0, 0, 0), 0), ((3, 5, 7), 31), ((7, 2, 9), 23), ((1, 1, 1), 31)]:
        def flip(x, index=index, bit=bit):
            x.view(np.uint32)[index] ^= np.uint32(1 << bit)
            return x
        after, _ = integrity.check(on_mesh(trainer, with_leaf(host, KERNEL, flip)))
        assert differing(before, after) == [KERNEL]
        lanes = before[KERNEL] ^ after[KERNEL]
        assert lanes & 0xFFFFFFFF and lanes >> 32  # both lanes see it


def test_any_single_bit_at_any_position_is_seen():
    """Weights are odd, so even the sign bit (2**31 times an even weight would vanish
    mod 2**32) changes each lane of the digest wherever it flips."""
    x = np.random.default_rng(2).standard_normal((4, 8)).astype(np.float32)
    variants = {"orig": x}
    for i in range(x.size):
        for bit in (0, 31):
            y = x.copy()
            y.reshape(-1).view(np.uint32)[i] ^= np.uint32(1 << bit)
            variants[f"{i}/{bit}"] = y
    for bit in range(32):
        y = x.copy()
        y.view(np.uint32)[2, 3] ^= np.uint32(1 << bit)
        variants[f"b{bit}"] = y
    digests, _ = integrity.check(jax.tree.map(jnp.asarray, variants))
    lanes = {k: d ^ digests["orig"] for k, d in digests.items() if k != "orig"}
    assert all(d & 0xFFFFFFFF and d >> 32 for d in lanes.values())  # each lane on its own


def test_xor_of_64_bytes_and_swapped_elements_change_the_digest(trainer):
    host = random_host_state(trainer, SHAPE)
    before, _ = integrity.check(on_mesh(trainer, host))
    rng = np.random.default_rng(3)
    for start in (0, 100, 4 * 8 * 16 * 8 - 64):
        def xor(x, start=start):
            x.reshape(-1).view(np.uint8)[start:start + 64] ^= rng.integers(
                1, 256, 64, dtype=np.uint8)
            return x
        after, _ = integrity.check(on_mesh(trainer, with_leaf(host, KERNEL, xor)))
        assert differing(before, after) == [KERNEL]

    def swap(x):
        x[0, 1, 2], x[5, 3, 4] = x[5, 3, 4].copy(), x[0, 1, 2].copy()
        return x
    after, _ = integrity.check(on_mesh(trainer, with_leaf(host, KERNEL, swap)))
    assert differing(before, after) == [KERNEL]


@pytest.mark.parametrize("path", [KERNEL, "opt_state/0/nu/inp/bias", "params/out/bias"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_one_nan_or_inf_anywhere_makes_the_state_not_finite(trainer, path, bad):
    host = random_host_state(trainer, SHAPE)
    assert integrity.check(on_mesh(trainer, host))[1]  # integer leaves are finite

    def spoil(x):
        x.reshape(-1)[-1] = bad
        return x
    assert not integrity.check(on_mesh(trainer, with_leaf(host, path, spoil)))[1]


def test_bfloat16_int32_int8_and_bool_leaves(devices):
    mesh = jax.make_mesh((2, 4), ("pipe", "data"))
    rng = np.random.default_rng(4)
    tree = {"w": rng.standard_normal((4, 8)).astype(jnp.bfloat16),
            "n": rng.integers(-1000, 1000, (8, 4)).astype(np.int32),
            "q": rng.integers(-128, 128, (8,)).astype(np.int8),
            "m": rng.integers(0, 2, (8,)).astype(bool)}
    put = lambda t: {k: jax.device_put(v, NamedSharding(mesh, P(*(["data"] + [None] * (
        v.ndim - 1))))) for k, v in t.items()}
    before, finite = integrity.check(put(tree))
    assert finite and len(set(before.values())) == 4
    padded = {k: np.pad(v, [(0, 8)] + [(0, 0)] * (v.ndim - 1)) for k, v in tree.items()}
    assert integrity.check(put(padded)) == (before, True)
    for key in tree:
        changed = dict(tree, **{key: tree[key].copy()})
        flat = changed[key].reshape(-1)
        flat[3] = ~flat[3] if key == "m" else flat[3] + flat.dtype.type(1)
        assert differing(before, integrity.check(put(changed))[0]) == [key]
    spoiled = dict(tree, w=tree["w"].copy())
    spoiled["w"][1, 1] = np.nan
    assert not integrity.check(put(spoiled))[1]


def test_compare_names_the_first_mismatching_or_missing_leaf():
    stored = {"params/a": 1, "params/b": 0xABC, "step": 7}
    assert integrity.compare(stored, dict(stored)) is None
    assert integrity.compare(stored, dict(stored, extra=5)) is None
    problem = integrity.compare(stored, dict(stored, **{"params/b": 0xABD}))
    assert "params/b" in problem and "0x" in problem and "\n" not in problem
    assert "params/a" not in problem
    missing = integrity.compare(stored, {"params/a": 1, "step": 7})
    assert "params/b" in missing and "\n" not in missing
