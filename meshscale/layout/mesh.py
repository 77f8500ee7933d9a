"""Mesh shapes and the `jax.sharding.Mesh` built from them.

A `MeshShape` is pure data (pipe x data devices, microbatches per replica, and how many
times each replica's microbatches circle the pipeline); `make_mesh`
is the only place that turns one into a JAX mesh, always with axes ("pipe", "data").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from meshscale.errors import InsufficientDevices, InvalidMeshShape

PIPE = "pipe"
DATA = "data"
AXES = (PIPE, DATA)
SCHEDULES: tuple[str, ...] = ("gpipe", "1f1b", "zb")  # `MeshShape.schedule`


@dataclasses.dataclass(frozen=True, order=True)
class MeshShape:
    """`pipe` stages x `data` replicas; each replica's batch is cut into `microbatches`.

    `repeats` > 1 selects the circular schedule (`meshscale.layout.schedule`): each stage holds
    `repeats` non-adjacent layer groups and the microbatches go round the pipeline that
    many times, shrinking the bubble from ``(p-1)/(M+p-1)`` to ``(p-1)/(r M+p-1)``.

    `schedule` orders each stage's forward and backward work (`SCHEDULES`; slot tables in
    `meshscale.layout.schedule`): ``"gpipe"`` (every forward, then autodiff's backward),
    ``"1f1b"`` (a stage holds at most ``pipe`` microbatches' inputs) or ``"zb"`` (weight
    gradients deferred into the bubble). It changes no stored state: a checkpoint
    restores onto any schedule.
    """

    pipe: int
    data: int
    microbatches: int = 1
    repeats: int = 1
    schedule: str = "gpipe"

    def __post_init__(self):
        for name in ("pipe", "data", "microbatches", "repeats"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise InvalidMeshShape(f"MeshShape.{name} must be a positive int, got {value!r}")
        if self.schedule not in SCHEDULES:
            raise InvalidMeshShape(f"MeshShape.schedule must be one of {', '.join(SCHEDULES)}, "
                                   f"got {self.schedule!r}")
        if self.repeats > 1 and self.schedule != "gpipe":
            raise InvalidMeshShape(
                f"repeats={self.repeats} (circular) runs only the gpipe schedule, not "
                f"{self.schedule}: use repeats=1 with {self.schedule}, or schedule='gpipe'")

    @property
    def num_devices(self) -> int:
        return self.pipe * self.data

    def __str__(self) -> str:
        text = f"{self.pipe}x{self.data}/m{self.microbatches}"
        text += f"/r{self.repeats}" if self.repeats > 1 else ""
        return text + (f"/{self.schedule}" if self.schedule != "gpipe" else "")

    @classmethod
    def parse(cls, text: str) -> MeshShape:
        """Parse "PxD", "PxD/mM", "PxD/mM/rR" or "PxD/mM/1f1b" (as printed by `str`;
        the schedule is one of `SCHEDULES`, gpipe when omitted)."""
        try:
            dims, *parts = text.lower().split("/")
            pipe, data = (int(v) for v in dims.split("x"))
            fields = {"microbatches": 1, "repeats": 1, "schedule": "gpipe"}
            for part in parts:
                if part in SCHEDULES:
                    fields["schedule"] = part
                elif part[:1] in ("m", "r") and part[1:].isdigit():
                    fields["microbatches" if part[0] == "m" else "repeats"] = int(part[1:])
                else:
                    raise ValueError(part)
            return cls(pipe, data, **fields)
        except ValueError as e:
            if isinstance(e, InvalidMeshShape):
                raise
            raise InvalidMeshShape(f"cannot parse mesh shape {text!r}: write "
                                   f"PIPExDATA[/mM][/rR][/{'|'.join(SCHEDULES[1:])}]") from e


def make_mesh(shape: MeshShape, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The ("pipe", "data") mesh over the first `shape.num_devices` of `devices`.

    Consecutive devices form one pipeline column, so neighbouring stages sit on
    neighbouring devices (the ppermute between stages stays local where it can).
    """
    devices = list(jax.devices() if devices is None else devices)
    if shape.num_devices > len(devices):
        raise InsufficientDevices(
            f"mesh {shape.pipe}x{shape.data} needs {shape.num_devices} devices, "
            f"only {len(devices)} available: choose a smaller shape or add devices"
        )
    grid = np.array(devices[: shape.num_devices], dtype=object).reshape(shape.data, shape.pipe).T
    return Mesh(grid, AXES, axis_types=(AxisType.Auto, AxisType.Auto))


def device_ids(devices: Sequence[jax.Device]) -> tuple[int, ...]:
    return tuple(int(d.id) for d in devices)
