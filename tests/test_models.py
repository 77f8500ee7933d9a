"""The shipped models follow the contract, and the GPT learns real text."""

import jax
import numpy as np
import optax
from flax import nnx
from meshscale.models.gpt import GPT, GPTConfig, sample
from meshscale.models.llama import Llama, LlamaConfig
from meshscale.models.text import ByteBatches, stdlib_text

from meshscale import MeshShape, ReshardableModel, Trainer
from meshscale.model.contract import FunctionalModel, check_contract
from tests.helpers import make_model


def test_shipped_models_follow_the_contract():
    for name in ("mlp", "gpt"):
        model = make_model(name)
        check_contract(model)
        assert isinstance(model, ReshardableModel)
        _, params = FunctionalModel.of(model)
        for leaf in jax.tree.leaves(params["blocks"]):
            assert leaf.shape[0] == model.num_layers


def test_gpt_untied_head_has_its_own_unembedding():
    tied = GPT(GPTConfig(num_layers=2, d_model=16, num_heads=2, seq_len=8), rngs=nnx.Rngs(0))
    untied = GPT(GPTConfig(num_layers=2, d_model=16, num_heads=2, seq_len=8, tied=False),
                 rngs=nnx.Rngs(0))
    assert "unembed" in FunctionalModel.of(untied)[1]
    assert "unembed" not in FunctionalModel.of(tied)[1]
    batch = untied.example_batch(4)
    assert np.isfinite(float(untied.loss(batch)))


def test_gpt_is_causal():
    model = GPT(GPTConfig(num_layers=2, d_model=16, num_heads=2, seq_len=8), rngs=nnx.Rngs(0))
    tokens = np.arange(8, dtype=np.int32)[None] + 40
    changed = tokens.copy()
    changed[0, -1] = 99  # changing the last token must not change earlier positions
    a, b = model.logits(tokens), model.logits(changed)
    np.testing.assert_array_equal(np.asarray(a[0, :-1]), np.asarray(b[0, :-1]))
    assert not np.allclose(np.asarray(a[0, -1]), np.asarray(b[0, -1]))


def test_byte_batches_are_deterministic_windows_of_the_stdlib():
    text = stdlib_text(200_000)
    assert b"def " in text and len(text) == 200_000
    data = ByteBatches(text, seq_len=16, batch_size=4, seed=3)
    first = data.batch(7)
    np.testing.assert_array_equal(first["tokens"], data.batch(7)["tokens"])
    assert first["tokens"].shape == (4, 17) and first["tokens"].dtype == np.int32
    assert not np.array_equal(first["tokens"], data.batch(8)["tokens"])


def train_on_stdlib(model, seq_len: int, steps: int = 40):
    """`steps` Adam steps of `model` on Python source, pipelined on 2x2; (losses, params)."""
    trainer = Trainer(model, optax.adam(1e-2), global_batch=16)
    data = ByteBatches(stdlib_text(), seq_len=seq_len, batch_size=16)
    shape = MeshShape(2, 2, 2)
    state, step = trainer.init_state(shape), trainer.compile_step(shape)
    losses = []
    for i in range(steps):
        state, metrics = step(state, trainer.put_batch(data.batch(i), shape))
        losses.append(float(metrics["loss"]))
    assert losses[0] > 5.0  # about ln(256) at the start
    assert np.mean(losses[-5:]) < losses[0] - 2.0, losses
    return losses, jax.device_get(state.params)


def test_gpt_loss_goes_down_on_python_source():
    # A narrow GPT (the tiny preset's byte vocabulary and attention, fewer layers and
    # positions) so the suite stays fast; `make demo` trains the tiny preset itself.
    cfg = GPTConfig(seq_len=32, num_layers=2, d_model=32, num_heads=2)
    model = GPT(cfg, rngs=nnx.Rngs(0))
    _, params = train_on_stdlib(model, cfg.seq_len)
    trained = FunctionalModel.of(model)[0].merge(params)
    assert len(sample(trained, b"def ", 8)) == 8


def test_llama_loss_goes_down_on_python_source():
    cfg = LlamaConfig.preset("tiny")  # what `meshscale demo --model llama-tiny` trains
    train_on_stdlib(Llama(cfg, rngs=nnx.Rngs(0)), cfg.seq_len)


def test_llama_presets_have_the_published_shapes():
    for preset, billions in (("8b", 8.0), ("70b", 70.6)):
        abstract = nnx.eval_shape(lambda p=preset: Llama(LlamaConfig.preset(p),
                                                         rngs=nnx.Rngs(0)))
        _, params = FunctionalModel.of(abstract)
        count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
        assert abs(count / 1e9 - billions) < 0.05, count
