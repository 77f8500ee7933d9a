"""A deep residual MLP regressor: the smallest model that exercises every mesh shape."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from meshscale.model.contract import LayerStack, stack_layers


@dataclasses.dataclass(frozen=True)
class MLPConfig:
    num_layers: int = 8
    features: int = 16
    hidden: int = 32
    inputs: int = 8
    outputs: int = 4


class ResidualBlock(nnx.Module):
    """h + W2 gelu(W1 layernorm(h))."""

    def __init__(self, cfg: MLPConfig, rngs: nnx.Rngs):
        self.norm = nnx.LayerNorm(cfg.features, rngs=rngs)
        self.up = nnx.Linear(cfg.features, cfg.hidden, rngs=rngs)
        self.down = nnx.Linear(cfg.hidden, cfg.features, rngs=rngs)

    def __call__(self, h: jax.Array) -> jax.Array:
        return h + self.down(jax.nn.gelu(self.up(self.norm(h))))


class ResidualMLP(LayerStack):
    """Regressor: x -> Linear -> num_layers residual blocks -> Linear; mean squared error."""

    def __init__(self, cfg: MLPConfig = MLPConfig(), *, rngs: nnx.Rngs):
        self.config = cfg
        self.num_layers = cfg.num_layers
        self.inp = nnx.Linear(cfg.inputs, cfg.features, rngs=rngs)
        self.blocks = stack_layers(lambda r: ResidualBlock(cfg, r), cfg.num_layers, rngs)
        self.out = nnx.Linear(cfg.features, cfg.outputs, rngs=rngs)

    def embed(self, batch) -> jax.Array:
        return self.inp(batch["x"])

    def head_loss(self, h: jax.Array, batch) -> jax.Array:
        return jnp.mean((self.out(h) - batch["y"]) ** 2)

    def example_batch(self, batch_size: int, seed: int = 0) -> dict:
        """A synthetic regression batch (y is a fixed nonlinear function of x)."""
        kx, _ = jax.random.split(jax.random.key(seed))
        x = jax.random.normal(kx, (batch_size, self.config.inputs), jnp.float32)
        y = jnp.tanh(x[:, : self.config.outputs] * 2.0) + 0.1 * x[:, -self.config.outputs:]
        return {"x": x, "y": y}
