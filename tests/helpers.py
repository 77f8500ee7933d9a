"""Small shared pieces of the test suite: tiny models and the float32 comparison."""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess

import jax
import numpy as np
import optax
import pytest
from flax import nnx
from meshscale.models.gpt import GPT, GPTConfig
from meshscale.models.mlp import MLPConfig, ResidualMLP

GLOBAL_BATCH = 32
SIMPLE_TOL = 1e-5  # chosen once (STYLE.md); never loosened to make a test pass
DEEP_TOL = 1e-4

TEST_GPT = GPTConfig(seq_len=16, num_layers=8, d_model=32, num_heads=2)
TEST_MLP = MLPConfig(num_layers=8, features=16, hidden=32)


def make_model(name: str, seed: int = 0):
    if name == "mlp":
        return ResidualMLP(TEST_MLP, rngs=nnx.Rngs(seed))
    if name == "gpt":
        return GPT(TEST_GPT, rngs=nnx.Rngs(seed))
    raise ValueError(name)


def make_optimizer():
    return optax.adam(1e-2, eps=1e-6)


def prefer_more_devices(candidate, global_batch: int = 24):
    """An injected try-run measurement (no timing decides a test): more devices, then
    more data replicas, is faster."""
    from meshscale.planning.tryrun import TryRunResult

    shape = candidate.shape
    speed = 1e9 * (shape.num_devices + 0.1 * shape.data)
    return TryRunResult(shape, candidate.kind, "ok", step_seconds=global_batch / speed,
                        step_spread=0.0, samples_per_second=speed,
                        samples_per_second_per_device=speed / shape.num_devices,
                        num_devices=shape.num_devices)


def assert_trees_close(actual, expected, tol: float, what: str = "") -> None:
    """Every leaf within `tol` of the reference, relative to the reference's scale."""
    flat_a = jax.tree_util.tree_flatten_with_path(actual)[0]
    flat_e = jax.tree_util.tree_flatten_with_path(expected)[0]
    assert [p for p, _ in flat_a] == [p for p, _ in flat_e], f"{what}: tree structures differ"
    for (path, a), (_, e) in zip(flat_a, flat_e, strict=True):
        a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
        scale = max(1.0, float(np.max(np.abs(e))) if e.size else 1.0)
        err = float(np.max(np.abs(a - e))) if e.size else 0.0
        assert err <= tol * scale, f"{what}{jax.tree_util.keystr(path)}: max error {err:.3g}"


def assert_trees_equal(actual, expected) -> None:
    """Bit-identical leaves (shape, dtype and every value)."""
    flat_a = jax.tree_util.tree_flatten_with_path(actual)[0]
    flat_e = jax.tree_util.tree_flatten_with_path(expected)[0]
    assert len(flat_a) == len(flat_e)
    for (path, a), (_, e) in zip(flat_a, flat_e, strict=True):
        a, e = np.asarray(a), np.asarray(e)
        assert a.dtype == e.dtype, jax.tree_util.keystr(path)
        np.testing.assert_array_equal(a, e, err_msg=jax.tree_util.keystr(path))


def cli_factory():
    """A user's own model for `meshscale search --model tests.helpers:cli_factory`."""
    model = make_model("mlp")
    return model, jax.device_get(model.example_batch(8))


def contents(root) -> dict[str, str]:
    """Every file under `root` with the sha256 of its bytes (a byte-for-byte record)."""
    record = {}
    for folder, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                record[os.path.relpath(os.path.join(folder, name), root)] = \
                    hashlib.sha256(f.read()).hexdigest()
    return record


@contextlib.contextmanager
def read_only_tmpfs(where):
    """A small tmpfs mounted read-only at `where` (chmod does not stop root); skips the
    test where mounting is not allowed, and always unmounts."""
    where.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m,ro", "tmpfs", str(where)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here: {mounted.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


def random_host_state(trainer, shape, seed=0):
    """A train state on the host whose every leaf (step included) is random, not initial;
    padded with zeros for `shape`'s mesh (`meshscale.layout.padding`), as training keeps it."""
    from meshscale.layout.padding import pad

    rng = np.random.default_rng(seed)
    host = jax.tree.map(
        lambda a: (rng.standard_normal(a.shape).astype(a.dtype)
                   if np.issubdtype(a.dtype, np.floating)
                   else rng.integers(1, 1000, a.shape).astype(a.dtype)),
        trainer.abstract_state())
    stored = pad(host, trainer.abstract_state(shape), trainer.num_layers)
    return jax.tree.map(np.array, jax.device_get(stored))
