"""Models by name, for the CLI, the demo and the benchmarks: (model, batch_fn).

``batch_fn(batch_size, i)`` is host batch `i`, a pure function of (seed, i), so a resumed
run sees the same data as an uninterrupted one. Besides the names below, any model that
meets the contract loads as ``package.module:factory``: ``factory()`` returns the model
(with an ``example_batch(n)`` method) or a pair ``(model, example_batch)``.
"""

from __future__ import annotations

from collections.abc import Callable

NAMES = ("gpt-tiny", "gpt-small", "llama-tiny", "mlp")
BatchFn = Callable[[int, int], dict]


def build(name: str, seed: int = 0) -> tuple[object, BatchFn]:
    import jax
    from flax import nnx

    if ":" in name:
        return from_factory(name)
    if name == "llama-tiny":
        from meshscale.models.llama import Llama, LlamaConfig
        from meshscale.models.text import ByteBatches, stdlib_text

        model = Llama(LlamaConfig.preset("tiny"), rngs=nnx.Rngs(seed))
        text = stdlib_text(1_000_000)
        return model, lambda size, i: ByteBatches(
            text, seq_len=model.config.seq_len, batch_size=size, seed=seed).batch(i)
    if name.startswith("gpt-"):
        from meshscale.models.gpt import GPT, GPTConfig
        from meshscale.models.text import ByteBatches, stdlib_text

        model = GPT(GPTConfig.preset(name.removeprefix("gpt-")), rngs=nnx.Rngs(seed))
        text = stdlib_text(1_000_000)
        return model, lambda size, i: ByteBatches(
            text, seq_len=model.config.seq_len, batch_size=size, seed=seed).batch(i)
    if name == "mlp":
        from meshscale.models.mlp import MLPConfig, ResidualMLP

        model = ResidualMLP(MLPConfig(), rngs=nnx.Rngs(seed))
        return model, lambda size, i: jax.device_get(
            model.example_batch(size, seed=seed * 100_003 + i))
    raise ValueError(f"unknown model {name!r}: choose one of {', '.join(NAMES)}")


def from_factory(spec: str) -> tuple[object, BatchFn]:
    """(model, batch_fn) from ``package.module:factory`` (see the module docstring)."""
    import importlib

    module, _, attr = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError) as e:
        raise ValueError(f"cannot load model {spec!r} ({e}): write package.module:factory, "
                         "importable from the current directory") from e
    made = factory()
    model, example = made if isinstance(made, tuple) else (made, None)
    if example is not None:
        return model, lambda size, i: example
    if not hasattr(model, "example_batch"):
        raise ValueError(f"{spec} returned a model without example_batch(n): return "
                         "(model, example_batch) instead")
    return model, lambda size, i: model.example_batch(size, seed=i)
