"""Per-device memory: what a compiled step needs, what a device has, and `p_min="auto"`.

The need is read from XLA (`compiled.memory_analysis()`, which reports one device's share
of an SPMD executable), never estimated by hand; the budget comes from the backend
(`device.memory_stats()["bytes_limit"]` on GPU/TPU) or from the user (CPU has none).
Nothing here runs a step: checking a shape costs one compile, which the search reuses.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence

import jax

from meshscale.errors import InsufficientDevices, MeshscaleError
from meshscale.layout.mesh import MeshShape
from meshscale.planning.space import default_microbatches

log = logging.getLogger(__name__)

_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
    "t": 10**12, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
GiB = 2**30


def parse_bytes(text: str | int | float) -> int:
    """``"2GiB"`` -> 2147483648; accepts B, kB/MB/GB/TB (powers of 10), KiB..TiB, numbers."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
        if not match or match.group(2).lower() not in _UNITS:
            raise MeshscaleError(
                f"cannot read {text!r} as a memory size: write e.g. 2GiB, 512MiB or 8GB")
        value, unit = float(match.group(1)), match.group(2).lower()
    if value <= 0:
        raise MeshscaleError(f"memory size must be positive, got {text!r}")
    return int(value * _UNITS[unit])


def format_bytes(n: float | None) -> str:
    """Bytes in GiB/MiB/KiB for people (``"1.50 GiB"``)."""
    if n is None:
        return "-"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def bytes_per_device(compiled: jax.stages.Compiled) -> int:
    """Peak bytes one device holds for `compiled`: arguments + outputs - aliased + temp.

    Donated inputs aliased to outputs are counted once; generated code is included.
    """
    stats = compiled.memory_analysis()
    if stats is None:
        raise MeshscaleError("this backend gives no memory_analysis() for compiled steps")
    return int(stats.argument_size_in_bytes + stats.output_size_in_bytes
               - stats.alias_size_in_bytes + stats.temp_size_in_bytes
               + stats.generated_code_size_in_bytes)


def device_budget(device: jax.Device) -> int | None:
    """The backend's memory limit for `device` in bytes, or None when it does not say."""
    try:
        stats = device.memory_stats()
    except Exception:  # some backends raise instead of returning None
        return None
    limit = (stats or {}).get("bytes_limit")
    return int(limit) if limit else None


def memory_budget(devices: Sequence[jax.Device],
                  user: str | int | float | None = None) -> int | None:
    """Bytes a compiled step may use per device: the backend's limit, capped by `user`.

    On CPU the backend gives no limit, so the user value (e.g. ``"2GiB"``) is the budget;
    with neither, None (no memory check). On an accelerator a user value can only lower
    the limit (to leave headroom), never raise it.
    """
    limits = [b for b in (device_budget(d) for d in devices) if b is not None]
    backend = min(limits) if limits else None
    mine = parse_bytes(user) if user is not None else None
    known = [b for b in (backend, mine) if b is not None]
    return min(known) if known else None


def fits(bytes_needed: int, budget: int | None) -> bool:
    return budget is None or bytes_needed <= budget


def over_budget_reason(bytes_needed: int, budget: int) -> str:
    return (f"skipped: would need {format_bytes(bytes_needed)} per device, "
            f"budget {format_bytes(budget)}")


def resolve_p_min(trainer, devices: Sequence[jax.Device], p_min: int | str,
                  budget: int | None) -> int:
    """`p_min` itself, or for ``"auto"`` the smallest pipe width whose compiled step fits
    `budget` bytes per device (`auto_p_min`).

    What this process's own memory analysis says: processes that must agree on one width
    (`meshscale.search`) share one answer themselves.

    Raises:
      MeshscaleError: ``"auto"`` with no budget known.
      InsufficientDevices: ``"auto"`` and not even ``pipe = len(devices)`` fits.
    """
    if p_min != "auto":
        return p_min
    if budget is None:
        raise MeshscaleError("p_min='auto' needs a memory budget and this backend reports "
                             "none: pass memory_budget='2GiB' (CLI: --device-memory 2GiB)")
    return auto_p_min(trainer, devices, budget=budget)


def auto_p_min(trainer, devices: Sequence[jax.Device], *, budget: int) -> int:
    """The smallest pipe width whose compiled step fits `budget` bytes per device.

    Each pipe width ``p`` up to ``len(devices)`` and the layer count is compiled as
    ``p x 1`` (one replica: the whole global batch, so the most activations a device can
    hold at that width; any wider data axis needs less) and its `bytes_per_device`
    compared with `budget`. The executables land in ``trainer.cache``, so the search that
    follows reuses them.

    Raises:
      InsufficientDevices: not even ``pipe = len(devices)`` fits.
    """
    needed: list[str] = []
    for pipe in range(1, min(len(devices), trainer.num_layers) + 1):
        shape = MeshShape(pipe, 1, default_microbatches(pipe, trainer.global_batch))
        try:
            trainer.check(shape, devices)
        except MeshscaleError:
            continue
        need = bytes_per_device(trainer.compile_step(shape, devices))
        log.info("p_min auto: %s needs %s per device (budget %s)", shape,
                 format_bytes(need), format_bytes(budget))
        if need <= budget:
            return pipe
        needed.append(f"{pipe}: {format_bytes(need)}")
    raise InsufficientDevices(
        f"no pipe width up to {len(devices)} fits {format_bytes(budget)} per device "
        f"(needs per pipe width: {', '.join(needed) or 'none valid'}): add devices, raise "
        f"the budget or shrink the model or batch")
