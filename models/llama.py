"""A Llama-3-style decoder LM in the reshardable form.

token embedding -> `num_layers` blocks (RMSNorm, grouped-query causal attention with
rotary positions, RMSNorm, SwiGLU MLP) -> RMSNorm -> unembedding (its own matrix, or tied
to the token table) -> next-token cross-entropy, summed over real target tokens and
returned with their count (a token-weighted mean, exact on every mesh).

A batch is ``{"tokens": int32[B, seq_len + 1]}`` (inputs ``tokens[:, :-1]``, targets
``tokens[:, 1:]``), optionally with ``"segments": int32[B, seq_len + 1]``: 0 marks
padding (left or right), and packed sequences carry 1, 2, ... Attention stays within a
segment, positions restart at each segment, and a target counts only inside its input's
segment. Layers receive positions and segments through `layer_inputs`.

Presets: ``tiny`` trains on a CPU; ``8b`` and ``70b`` have Llama-3-8B / 70B shapes, for
building abstractly (`nnx.eval_shape`) and compiling, never for allocating here.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from meshscale.model.contract import LayerStack, stack_layers
from meshscale.model.rng import dropout


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab: int = 256
    seq_len: int = 64
    num_layers: int = 4
    d_model: int = 64
    num_heads: int = 4
    num_kv_heads: int = 2
    mlp_hidden: int = 172
    rope_theta: float = 500_000.0
    norm_eps: float = 1e-5
    tied: bool = False
    sliding_window: int = 0  # > 0: a local layer attends to at most this many positions
    global_every: int = 1  # with a window: every this-many-th layer is global (Gemma 3: 6)
    dropout: float = 0.0  # on the attention and MLP outputs, when the trainer gives keys

    @classmethod
    def preset(cls, name: str) -> LlamaConfig:
        presets = {
            "tiny": cls(),
            "8b": cls(vocab=128_256, seq_len=8192, num_layers=32, d_model=4096, num_heads=32,
                      num_kv_heads=8, mlp_hidden=14_336),
            "70b": cls(vocab=128_256, seq_len=8192, num_layers=80, d_model=8192, num_heads=64,
                       num_kv_heads=8, mlp_hidden=28_672),
        }
        if name not in presets:
            raise ValueError(f"unknown Llama preset {name!r}: choose one of {sorted(presets)}")
        return presets[name]

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary position embedding of ``x[B, T, H, D]`` at ``positions[B, T]`` (Su et al.)."""
    d = x.shape[-1]
    freqs = theta ** (-jnp.arange(0, d, 2, dtype=jnp.float32) / d)
    angles = positions.astype(jnp.float32)[..., None] * freqs  # [B, T, D/2]
    cos, sin = jnp.cos(angles)[:, :, None], jnp.sin(angles)[:, :, None]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x.dtype)


class Block(nnx.Module):
    """h + attn(norm(h)), then h + swiglu(norm(h))."""

    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs, local: bool = False):
        d, hd = cfg.d_model, cfg.head_dim
        self.cfg = cfg
        self.window = cfg.sliding_window if local else 0
        linear = lambda i, o: nnx.Linear(i, o, use_bias=False, rngs=rngs)
        self.attn_norm = nnx.RMSNorm(d, epsilon=cfg.norm_eps, rngs=rngs)
        self.q = linear(d, cfg.num_heads * hd)
        self.kv = linear(d, 2 * cfg.num_kv_heads * hd)
        self.o = linear(cfg.num_heads * hd, d)
        self.mlp_norm = nnx.RMSNorm(d, epsilon=cfg.norm_eps, rngs=rngs)
        self.gate = linear(d, cfg.mlp_hidden)
        self.up = linear(d, cfg.mlp_hidden)
        self.down = linear(cfg.mlp_hidden, d)

    def attention(self, x: jax.Array, side: dict) -> jax.Array:
        cfg = self.cfg
        b, t, _ = x.shape
        q = self.q(x).reshape(b, t, cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads,
                              cfg.head_dim)
        k, v = jnp.split(self.kv(x).reshape(b, t, 2 * cfg.num_kv_heads, cfg.head_dim), 2, 2)
        positions = side["positions"]
        q = rope(q.reshape(b, t, cfg.num_heads, cfg.head_dim), positions,
                 cfg.rope_theta).reshape(q.shape)
        k = rope(k, positions, cfg.rope_theta)
        scores = jnp.einsum("bqkgd,bskd->bkgqs", q, k) / jnp.sqrt(cfg.head_dim).astype(x.dtype)
        seg = side["segments"]
        mask = (seg[:, :, None] == seg[:, None, :]) & jnp.tril(jnp.ones((t, t), dtype=bool))
        if self.window:  # a local layer: only the last `window` positions of its segment
            mask &= positions[:, :, None] - positions[:, None, :] < self.window
        scores = jnp.where(mask[:, None, None], scores, jnp.finfo(scores.dtype).min)
        out = jnp.einsum("bkgqs,bskd->bqkgd", jax.nn.softmax(scores, axis=-1), v)
        return self.o(out.reshape(b, t, cfg.num_heads * cfg.head_dim))

    def __call__(self, h: jax.Array, side: dict, rng: jax.Array | None = None) -> jax.Array:
        """`rng`: one key per example (`meshscale.model.rng`), or None for no dropout."""
        keys = [None, None] if rng is None else [
            jax.vmap(jax.random.fold_in, (0, None))(rng, i) for i in range(2)]
        rate = self.cfg.dropout
        h = h + dropout(self.attention(self.attn_norm(h), side), rate, keys[0])
        x = self.mlp_norm(h)
        return h + dropout(self.down(jax.nn.silu(self.gate(x)) * self.up(x)), rate, keys[1])


class Llama(LayerStack):
    def __init__(self, cfg: LlamaConfig = LlamaConfig(), *, rngs: nnx.Rngs):
        if cfg.d_model % cfg.num_heads or cfg.num_heads % cfg.num_kv_heads:
            raise ValueError(f"d_model {cfg.d_model}, num_heads {cfg.num_heads} and "
                             f"num_kv_heads {cfg.num_kv_heads} must divide one another")
        self.config = cfg
        self.num_layers = cfg.num_layers
        self.tok = nnx.Embed(cfg.vocab, cfg.d_model, rngs=rngs)
        if cfg.sliding_window and cfg.global_every > 1:  # local, ..., local, global
            self.blocks = stack_layers(
                lambda r, kind: Block(cfg, r, local=kind < cfg.global_every - 1),
                cfg.num_layers, rngs, kinds=cfg.global_every)
        else:
            self.blocks = stack_layers(lambda r: Block(cfg, r, local=bool(cfg.sliding_window)),
                                       cfg.num_layers, rngs)
        self.norm = nnx.RMSNorm(cfg.d_model, epsilon=cfg.norm_eps, rngs=rngs)
        self.unembed = None if cfg.tied else nnx.Linear(cfg.d_model, cfg.vocab, use_bias=False,
                                                        rngs=rngs)

    def embed(self, batch) -> jax.Array:
        return self.tok(batch["tokens"][:, :-1])

    def layer_inputs(self, batch) -> dict:
        """Per-token positions (restarting at each segment) and segment ids of the inputs."""
        seg = _segments(batch)[:, :-1]
        starts = jnp.concatenate([jnp.ones_like(seg[:, :1], bool), seg[:, 1:] != seg[:, :-1]],
                                 axis=1)
        index = jnp.arange(seg.shape[1])[None]
        last_start = jax.lax.cummax(jnp.where(starts, index, 0), axis=1)
        return {"positions": index - last_start, "segments": seg}

    def head_loss(self, h: jax.Array, batch) -> tuple[jax.Array, jax.Array]:
        h = self.norm(h)
        logits = self.tok.attend(h) if self.unembed is None else self.unembed(h)
        losses = optax.softmax_cross_entropy_with_integer_labels(
            logits.astype(jnp.float32), batch["tokens"][:, 1:])
        seg = _segments(batch)
        weight = ((seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] != 0)).astype(jnp.float32)
        return jnp.sum(losses * weight), jnp.sum(weight)

    def example_batch(self, batch_size: int, seed: int = 0) -> dict:
        shape = (batch_size, self.config.seq_len + 1)
        return {"tokens": jax.random.randint(jax.random.key(seed), shape, 0, self.config.vocab,
                                             dtype=jnp.int32)}


def _segments(batch) -> jax.Array:
    tokens = batch["tokens"]
    return batch.get("segments", jnp.ones(tokens.shape, jnp.int32))
