"""The JSON form of anything the loop reports (events, decisions, shapes, numbers)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from meshscale.layout.mesh import MeshShape


def to_plain(obj: Any) -> Any:
    """JSON-ready form: events -> their dict, dataclasses -> dicts, shapes -> "PxD/mM",
    nan and inf -> None, numpy / jax scalars -> Python numbers."""
    if isinstance(obj, MeshShape):
        return str(obj)
    if hasattr(obj, "as_dict") and callable(obj.as_dict):  # an event: its kind included
        return to_plain(obj.as_dict())
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if hasattr(obj, "item"):  # numpy / jax scalars
        return to_plain(obj.item())
    return str(obj)
