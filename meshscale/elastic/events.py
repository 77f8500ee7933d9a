"""What the elastic loop tells the world: one frozen dataclass per kind of event.

`ElasticTrainer.on_event` and `ElasticTrainer.history` carry these; a reader matches on
the type (``isinstance(e, events.Switch)``) and reads typed fields. `as_dict` is the
JSON form of report.json (``{"event": kind, "time", "step", ...fields}``). For one
release an event also reads like the dict it used to be (``e["event"]``, ``e["after"]``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

from meshscale.planning.search import Decision


@dataclasses.dataclass(frozen=True)
class Event(Mapping):
    """Base of every event: when (wall time) and at which step (None before the first)."""

    kind: ClassVar[str] = "event"
    time: float
    step: int | None

    def as_dict(self) -> dict[str, Any]:
        return {"event": self.kind,
                **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}}

    # the dict form of meshscale 0.1, read-only
    def __getitem__(self, key: str) -> Any:
        return self.as_dict()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.as_dict())

    def __len__(self) -> int:
        return len(dataclasses.fields(self)) + 1


@dataclasses.dataclass(frozen=True)
class Start(Event):
    """Training starts from scratch on `num_devices` devices."""

    kind: ClassVar[str] = "start"
    num_devices: int


@dataclasses.dataclass(frozen=True)
class Resume(Event):
    """Training resumes from the checkpoint of `checkpoint_step`."""

    kind: ClassVar[str] = "resume"
    checkpoint_step: int
    num_devices: int


@dataclasses.dataclass(frozen=True)
class DevicesChanged(Event):
    """The resource source grants another set of devices (seen at a poll)."""

    kind: ClassVar[str] = "devices_changed"
    before: int
    after: int
    device_ids: list[int]


@dataclasses.dataclass(frozen=True)
class Checkpoint(Event):
    """A save started; `seconds` is its blocking part (the copy off the devices)."""

    kind: ClassVar[str] = "checkpoint"
    checkpoint_step: int
    reason: str
    seconds: float


@dataclasses.dataclass(frozen=True)
class CheckpointFailed(Event):
    """A background write failed: the step is not on disk."""

    kind: ClassVar[str] = "checkpoint_failed"
    reason: str


@dataclasses.dataclass(frozen=True)
class Search(Event):
    """Try-runs on `num_devices` devices and the decision (with every try-run)."""

    kind: ClassVar[str] = "search"
    num_devices: int
    decision: Decision
    seconds: float


@dataclasses.dataclass(frozen=True)
class Restore(Event):
    """The live state was read back (a try-run needed its memory)."""

    kind: ClassVar[str] = "restore"
    reason: str
    checkpoint_step: int | None


@dataclasses.dataclass(frozen=True)
class Switch(Event):
    """Training moved to mesh `after` (`reason`: start, faster, or forced)."""

    kind: ClassVar[str] = "switch"
    before: str | None
    after: str
    num_devices: int
    reason: str
    seconds: float


@dataclasses.dataclass(frozen=True)
class Precompile(Event):
    """Meshes of the likely next device counts were queued for background compiles."""

    kind: ClassVar[str] = "precompile"
    counts: list[int]
    queued: int


@dataclasses.dataclass(frozen=True)
class NonFinite(Event):
    """Steps whose loss or gradient norm was nan or inf, and what was done."""

    kind: ClassVar[str] = "nonfinite"
    steps: list[int]
    action: str


@dataclasses.dataclass(frozen=True)
class Rewind(Event):
    """A non-finite step made the loop restore the newest (finite) checkpoint."""

    kind: ClassVar[str] = "rewind"
    nonfinite_step: int
    checkpoint_step: int


@dataclasses.dataclass(frozen=True)
class Interruption(Event):
    """SIGTERM / SIGINT: the step `checkpoint_step` was saved, the loop stops."""

    kind: ClassVar[str] = "interrupted"
    signal: str
    checkpoint_step: int | None


KINDS = {cls.kind: cls for cls in (Start, Resume, DevicesChanged, Checkpoint,
                                   CheckpointFailed, Search, Restore, Switch, Precompile,
                                   NonFinite, Rewind, Interruption)}
