"""Models by name, for the CLI, the demo and the benchmarks: (model, batch_fn).

``batch_fn(batch_size, i)`` is host batch `i`, a pure function of (seed, i), so a resumed
run sees the same data as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Callable

NAMES = ("gpt-tiny", "gpt-small", "mlp")
BatchFn = Callable[[int, int], dict]


def build(name: str, seed: int = 0) -> tuple[object, BatchFn]:
    import jax
    from flax import nnx

    if name.startswith("gpt-"):
        from models.gpt import GPT, GPTConfig
        from models.text import ByteBatches, stdlib_text

        model = GPT(GPTConfig.preset(name.removeprefix("gpt-")), rngs=nnx.Rngs(seed))
        text = stdlib_text(1_000_000)
        return model, lambda size, i: ByteBatches(
            text, seq_len=model.config.seq_len, batch_size=size, seed=seed).batch(i)
    if name == "mlp":
        from models.mlp import MLPConfig, ResidualMLP

        model = ResidualMLP(MLPConfig(), rngs=nnx.Rngs(seed))
        return model, lambda size, i: jax.device_get(
            model.example_batch(size, seed=seed * 100_003 + i))
    raise ValueError(f"unknown model {name!r}: choose one of {', '.join(NAMES)}")
