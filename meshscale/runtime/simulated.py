"""Simulated CPU devices: the one place that knows XLA's device-count flag.

XLA gives the CPU backend ``--xla_force_host_platform_device_count=N`` devices, read from
``XLA_FLAGS`` once, when the JAX backend starts; JAX reads ``JAX_PLATFORMS`` when it is
imported. `cpu_env` computes both for a child process (the launcher's, a Ray worker's);
`device_environment` sets them in this process's ``os.environ`` before its backend starts
(the CLI). Never imports jax unless the caller already has.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Mapping

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def cpu_env(count: int | None, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``JAX_PLATFORMS=cpu`` and, when `count` is given, ``XLA_FLAGS`` asking for `count`
    simulated CPU devices: `base`'s flags (default ``os.environ``'s) with any earlier
    device count replaced. Only these variables: merge them into an environment."""
    env = {"JAX_PLATFORMS": "cpu"}
    if count:
        flags = [f for f in (os.environ if base is None else base).get("XLA_FLAGS", "").split()
                 if not f.startswith(DEVICE_COUNT_FLAG)]
        env["XLA_FLAGS"] = " ".join([*flags, f"{DEVICE_COUNT_FLAG}={count}"])
    return env


@contextlib.contextmanager
def device_environment(count: int | None, platform: str) -> Iterator[None]:
    """Within: ``count`` simulated CPU devices (platform "cpu"), or the real ones ("auto").

    Must be entered before the JAX backend starts (it cannot change a started one); the
    environment is restored on exit so a caller's later subprocesses see their own.
    """
    saved = {k: os.environ.get(k) for k in ("XLA_FLAGS", "JAX_PLATFORMS")}
    try:
        if platform == "cpu":
            os.environ.update(cpu_env(count))
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
