"""Models by name, for the CLI, the demo and the benchmarks: (model, batch_fn).

``batch_fn(batch_size, i)`` is host batch `i`, a pure function of (seed, i), so a resumed
run sees the same data as an uninterrupted one.

Besides the names in `NAMES`, any model that meets the contract loads as
``package.module:factory`` (the current directory is importable, as for ``python -m``).
The factory contract, the one every `meshscale` command uses:

``factory()`` takes no argument and returns either

- the model, with an ``example_batch(n)`` method returning one batch of `n` examples
  (the README's form); if that method also takes a ``seed`` keyword, batch `i` is
  ``example_batch(n, seed=i)``, else every step trains on ``example_batch(n)``; or
- a pair ``(model, batch)``: one fixed batch, whose leading axis is the global batch.
"""

from __future__ import annotations

from collections.abc import Callable

NAMES = ("gpt-tiny", "gpt-small", "llama-tiny", "mlp")
BatchFn = Callable[[int, int], dict]
# Shapes only (for `meshscale search --plan`): never built, only traced.
ABSTRACT = {"llama-8b": "8b", "llama-70b": "70b"}


def abstract(name: str, global_batch: int) -> tuple[Callable[[], object], dict]:
    """(constructor, example batch of `jax.ShapeDtypeStruct`s) of a Llama-3 preset's shapes
    (`ABSTRACT`): a `Trainer` traces the constructor and allocates nothing."""
    import jax
    from flax import nnx
    from meshscale.models.llama import Llama, LlamaConfig

    if name not in ABSTRACT:
        raise ValueError(f"unknown abstract model {name!r}: choose one of {', '.join(ABSTRACT)}")
    cfg = LlamaConfig.preset(ABSTRACT[name])
    example = {"tokens": jax.ShapeDtypeStruct((global_batch, cfg.seq_len + 1), "int32")}
    return (lambda: Llama(cfg, rngs=nnx.Rngs(0))), example


def build(name: str, seed: int = 0) -> tuple[object, BatchFn]:
    import jax
    from flax import nnx

    if ":" in name:
        return from_factory(name)
    if name in ABSTRACT:
        raise ValueError(f"{name} is shapes only (nothing to train): use it with "
                         "meshscale search --plan")
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
    import os
    import sys

    module, _, attr = spec.partition(":")
    if os.getcwd() not in sys.path and "" not in sys.path:  # a console script's path
        sys.path.insert(0, os.getcwd())
    try:
        factory = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError) as e:
        raise ValueError(f"cannot load model {spec!r} ({e}): write package.module:factory, "
                         "importable from the current directory") from e
    made = factory()
    model, example = made if isinstance(made, tuple) else (made, None)
    if example is not None:
        return model, _fixed_batch(spec, example)
    if not callable(getattr(model, "example_batch", None)):
        raise ValueError(f"{spec} returned a model without example_batch(n): give it one, "
                         "or return (model, batch)")
    if _takes_seed(model.example_batch):
        return model, lambda size, i: model.example_batch(size, seed=i)
    return model, lambda size, i: model.example_batch(size)


def _takes_seed(method) -> bool:
    import inspect

    try:
        params = inspect.signature(method).parameters.values()
    except (TypeError, ValueError):  # no signature to read: call it the README's way
        return False
    return any(p.name == "seed" or p.kind is p.VAR_KEYWORD for p in params)


def _fixed_batch(spec: str, batch) -> BatchFn:
    """The factory's one batch for every step; a run whose global batch differs is
    refused with the sizes named."""
    import jax

    sizes = {x.shape[0] for x in jax.tree.leaves(batch) if getattr(x, "ndim", 0)}

    def batch_fn(size: int, i: int):
        if sizes and sizes != {size}:
            raise ValueError(f"{spec} returned a batch of {min(sizes)} examples, the global "
                             f"batch is {size}: pass --batch {min(sizes)}, or give the model "
                             "an example_batch(n) method instead")
        return batch

    return batch_fn
