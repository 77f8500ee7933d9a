"""The README's own-model example runs as written and matches its unpipelined loss."""

import pathlib
import re

import jax
import numpy as np

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
