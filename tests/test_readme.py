"""The README's own-model example runs as written and matches its unpipelined loss."""

import pathlib
import re
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from meshscale import MeshShape

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_own_model_example_trains_on_a_pipelined_mesh():
    block = next(b for b in python_blocks() if "class Regressor" in b)
    assert len(block.strip().splitlines()) <= 32
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)  # noqa: S102 - our own README
    model, trainer = scope["model"], scope["trainer"]
    batch = {"x": np.linspace(-1, 1, 32 * 4, dtype=np.float32).reshape(32, 4),
             "y": np.ones((32, 1), np.float32)}
    shape = MeshShape(2, 2, 2)
    expected = float(model.loss(batch))
    state = trainer.init_state(shape)
    state, metrics = trainer.compile_step(shape)(state, trainer.put_batch(batch, shape))
    np.testing.assert_allclose(float(metrics["loss"]), expected, rtol=1e-5)
    assert int(state.step) == 1 and jax.tree.leaves(state.params)


def test_readme_shows_the_two_commands_first():
    text = README.read_text()
    first_block = re.search(r"```bash\n(.*?)```", text, flags=re.S).group(1)
    assert "make demo" in first_block and "make test" in first_block


class TheirConfig:
    vocab, width, num_layers = 64, 16, 4


class TheirBlock(nnx.Module):
    """A stand-in for a third-party block with its own call signature."""

    def __init__(self, cfg, *, rngs):
        self.lin = nnx.Linear(cfg.width, cfg.width, rngs=rngs)

    def __call__(self, x, positions, mask):
        return x + jnp.tanh(self.lin(x)) * mask[..., None] + 0.01 * positions[..., None]


def test_readme_adapter_for_an_existing_model_fits_in_30_lines_and_is_exact(monkeypatch):
    block = next(b for b in python_blocks() if "class Adapted" in b)
    assert len(block.strip().splitlines()) <= 32  # 30 lines of adapter + the two imports
    monkeypatch.setitem(sys.modules, "their_lm", types.SimpleNamespace(
        Block=TheirBlock, Config=TheirConfig))
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)  # noqa: S102 - our own README
    trainer = scope["trainer"]
    rng = np.random.default_rng(0)
    mask = (rng.random((32, 65)) < 0.8).astype(np.int32)
    batch = {"tokens": rng.integers(0, 64, (32, 65)).astype(np.int32), "mask": mask}
    shape = MeshShape(2, 2, 2)
    state = trainer.init_state(shape)
    expected = float(trainer.fmodel.loss(jax.device_get(state.params), batch))
    state, metrics = trainer.compile_step(shape)(state, trainer.put_batch(batch, shape))
    np.testing.assert_allclose(float(metrics["loss"]), expected, rtol=1e-5)
