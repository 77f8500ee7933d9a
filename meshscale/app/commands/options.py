"""Argument types, option groups and the device environment more than one subcommand uses."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator

MODELS = ("gpt-tiny", "gpt-small", "llama-tiny", "mlp")  # models.registry.NAMES, no jax import
DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


@contextlib.contextmanager
def device_environment(count: int | None, platform: str) -> Iterator[None]:
    """Within: ``count`` simulated CPU devices (platform "cpu"), or the real ones ("auto").

    Must be entered before the JAX backend starts (it cannot change a started one); the
    environment is restored on exit so a caller's later subprocesses see their own.
    """
    saved = {k: os.environ.get(k) for k in ("XLA_FLAGS", "JAX_PLATFORMS")}
    try:
        if platform == "cpu":
            os.environ["JAX_PLATFORMS"] = "cpu"
            if count:
                flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
                         if not f.startswith(DEVICE_COUNT_FLAG)]
                os.environ["XLA_FLAGS"] = " ".join([*flags, f"{DEVICE_COUNT_FLAG}={count}"])
            if "jax" in sys.modules:  # imported (not started) before us: env was read already
                import jax

                if jax.config.jax_platforms != "cpu":
                    jax.config.update("jax_platforms", "cpu")
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {value}")
    return value


def add_run_options(p: argparse.ArgumentParser, d, *, schedule_help: str) -> None:
    """The options `demo` and `ray-demo` share, with defaults from their config `d`."""
    p.add_argument("--steps", type=positive, default=d.steps)
    p.add_argument("--schedule", default=d.schedule, help=schedule_help)
    p.add_argument("--p-min", type=positive, default=d.p_min)
    p.add_argument("--run-dir", default=d.run_dir,
                   help=f"where the run writes everything: checkpoints, report, compile cache "
                        f"(default {d.run_dir}; refused when it holds anything, unless "
                        f"{'--resume or ' if hasattr(d, 'resume') else ''}--overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in a RUN_DIR that holds a previous run or other files: "
                        "it is first moved aside to RUN_DIR.old-N, nothing is deleted "
                        "(default: off)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--batch", type=positive, default=d.global_batch, help="global batch")
    p.add_argument("--checkpoint-every", type=positive, default=d.checkpoint_every)
