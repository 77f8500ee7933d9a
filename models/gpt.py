"""A GPT-style decoder LM (byte-level by default) in the reshardable form.

token + position embedding -> `num_layers` pre-LN blocks (causal self-attention, MLP)
-> final LayerNorm -> unembedding (tied to the token table, or its own) -> next-token
cross-entropy. A batch is ``{"tokens": int32[B, seq_len + 1]}``: inputs are
``tokens[:, :-1]``, targets ``tokens[:, 1:]``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from meshscale.model.contract import LayerStack, run_layers, stack_layers


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    vocab: int = 256
    seq_len: int = 64
    num_layers: int = 8
    d_model: int = 64
    num_heads: int = 4
    mlp_ratio: int = 4
    tied: bool = True

    @classmethod
    def preset(cls, name: str) -> GPTConfig:
        """Named sizes: "tiny" trains on a CPU in seconds; "small" compiles for seconds."""
        presets = {
            "tiny": cls(),
            "small": cls(seq_len=128, num_layers=16, d_model=256, num_heads=8),
        }
        if name not in presets:
            raise ValueError(f"unknown GPT preset {name!r}: choose one of {sorted(presets)}")
        return presets[name]


class Block(nnx.Module):
    """Pre-LN transformer block: h + attn(ln(h)), then h + mlp(ln(h))."""

    def __init__(self, cfg: GPTConfig, rngs: nnx.Rngs):
        d = cfg.d_model
        self.num_heads = cfg.num_heads
        self.ln1 = nnx.LayerNorm(d, rngs=rngs)
        self.qkv = nnx.Linear(d, 3 * d, rngs=rngs)
        self.proj = nnx.Linear(d, d, rngs=rngs)
        self.ln2 = nnx.LayerNorm(d, rngs=rngs)
        self.up = nnx.Linear(d, cfg.mlp_ratio * d, rngs=rngs)
        self.down = nnx.Linear(cfg.mlp_ratio * d, d, rngs=rngs)

    def attention(self, x: jax.Array) -> jax.Array:
        b, t, d = x.shape
        q, k, v = jnp.split(self.qkv(x), 3, axis=-1)
        heads = lambda a: a.reshape(b, t, self.num_heads, d // self.num_heads)
        q, k, v = heads(q), heads(k), heads(v)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(q.shape[-1]).astype(q.dtype)
        causal = jnp.tril(jnp.ones((t, t), dtype=bool))
        scores = jnp.where(causal, scores, jnp.finfo(scores.dtype).min)
        out = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)
        return self.proj(out.reshape(b, t, d))

    def __call__(self, h: jax.Array) -> jax.Array:
        h = h + self.attention(self.ln1(h))
        return h + self.down(jax.nn.gelu(self.up(self.ln2(h))))


class GPT(LayerStack):
    def __init__(self, cfg: GPTConfig = GPTConfig(), *, rngs: nnx.Rngs):
        if cfg.d_model % cfg.num_heads:
            raise ValueError(
                f"d_model {cfg.d_model} must be divisible by num_heads {cfg.num_heads}")
        self.config = cfg
        self.num_layers = cfg.num_layers
        self.tok = nnx.Embed(cfg.vocab, cfg.d_model, rngs=rngs)
        self.pos = nnx.Embed(cfg.seq_len, cfg.d_model, rngs=rngs)
        self.blocks = stack_layers(lambda r: Block(cfg, r), cfg.num_layers, rngs)
        self.ln_f = nnx.LayerNorm(cfg.d_model, rngs=rngs)
        self.unembed = None if cfg.tied else nnx.Linear(cfg.d_model, cfg.vocab, rngs=rngs)

    def embed(self, batch) -> jax.Array:
        inputs = batch["tokens"][:, :-1]
        return self.tok(inputs) + self.pos(jnp.arange(inputs.shape[1]))[None]

    def _logits(self, h: jax.Array) -> jax.Array:
        h = self.ln_f(h)
        return self.tok.attend(h) if self.unembed is None else self.unembed(h)

    def head_loss(self, h: jax.Array, batch) -> jax.Array:
        targets = batch["tokens"][:, 1:]
        return optax.softmax_cross_entropy_with_integer_labels(self._logits(h), targets).mean()

    def logits(self, tokens: jax.Array) -> jax.Array:
        """Next-token logits for every position of `tokens` (int[B, T], T <= seq_len)."""
        t = tokens.shape[1]
        h = self.tok(tokens) + self.pos(jnp.arange(t))[None]
        return self._logits(run_layers(self.blocks, h))

    def example_batch(self, batch_size: int, seed: int = 0) -> dict:
        """Random tokens of the right shape (for compiling and tests)."""
        shape = (batch_size, self.config.seq_len + 1)
        return {"tokens": jax.random.randint(jax.random.key(seed), shape, 0, self.config.vocab,
                                             dtype=jnp.int32)}


def sample(model: GPT, prompt: bytes, length: int, *, seed: int = 0,
           temperature: float = 0.8) -> bytes:
    """Continue `prompt` by `length` bytes, sampling from the (unpipelined) model.

    The window is always `seq_len` long (right-padded while shorter; the model is causal,
    so padding after the last real token changes nothing before it): one compile.
    """
    cfg = model.config
    tokens = list(prompt) or [ord("\n")]
    logits_fn = jax.jit(lambda m, x: m.logits(x))
    key = jax.random.key(seed)
    for _ in range(length):
        window = tokens[-cfg.seq_len:]
        padded = jnp.asarray(window + [0] * (cfg.seq_len - len(window)), jnp.int32)[None]
        logits = logits_fn(model, padded)[0, len(window) - 1]
        key, sub = jax.random.split(key)
        tokens.append(int(jax.random.categorical(sub, logits / temperature)))
    return bytes(tokens[len(prompt):])
