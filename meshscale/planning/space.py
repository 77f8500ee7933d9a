"""The search space: which mesh shapes are worth a try-run on `n` devices (the rule).

Pure arithmetic over (devices, `p_min`, layers, global batch, current shape): nothing here
compiles, measures or touches JAX, so the rule is cheap to check exhaustively. A shape
`pipe x data / m` is *valid* when

- ``pipe >= p_min`` and ``pipe <= max_pipe`` (when given),
- ``pipe <= num_layers`` (every stage holds a layer; the split may be uneven,
  `meshscale.layout.schedule`), and with ``repeats`` r > 1 (the circular schedule)
  ``pipe * r <= num_layers`` and ``m >= pipe``,
- ``pipe * data <= n``,
- ``global_batch % data == 0`` and the replica batch ``global_batch / data`` splits into
  ``m`` microbatches.

When ``n % p_min == 0`` both axes may grow; otherwise only the pipe axis may change and the
data axis never grows past the current one (with no current shape the start is
``p_min x 1``). For each pipe width only the widest valid data axis is kept: wider data
means more replicas doing useful work for the same pipeline, and every extra candidate
costs a compile.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal

from meshscale.errors import InsufficientDevices, InvalidArgument
from meshscale.layout.mesh import MeshShape

Kind = Literal["current", "vertical", "horizontal"]
MicrobatchChoice = Sequence[int] | Literal["all"] | None
RepeatChoice = Sequence[int] | Literal["all"] | None
MICROBATCH_FACTORS = (1, 2, 4)  # microbatches = factor * pipe
REPEAT_CHOICES = (1, 2, 4)  # rounds of the circular schedule tried by repeats="all"


@dataclasses.dataclass(frozen=True)
class RuledOut:
    """Meshes the rule leaves out on these devices, and why, in one line.

    ``what`` names them: pipe widths (``"pipe 1"``, ``"pipe 9-16"``) or pipe x data
    shapes (``"2x4"``, ``"2x4, 2x3"``); ``reason`` says which input rules them out (p_min,
    the layer count, max_pipe, the global batch, the microbatch counts, the vertical-only
    rule) and what runs instead.
    """

    what: str
    reason: str

    def __str__(self) -> str:
        return f"{self.what}: {self.reason}"


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A mesh shape to try, tagged with how it relates to the mesh running now.

    ``kind`` is ``"current"`` for the current pipe x data (re-fitted: the same pipe width,
    the data axis no wider than now), ``"horizontal"`` when the data axis grew (more
    replicas) and ``"vertical"`` otherwise (the pipe width changed, data did not grow).
    With no current shape the reference is ``p_min x 1``: data > 1 is horizontal, data == 1
    vertical, and nothing is tagged current.
    """

    shape: MeshShape
    kind: Kind


def _near(pipe: int, replica_batch: int, factor: int) -> int | None:
    """The smallest count in ``[factor pipe, 2 factor pipe)`` dividing the replica batch
    (``factor * pipe`` itself when it divides; uneven pipe widths rarely divide a batch)."""
    low = factor * pipe
    return next((k for k in range(low, min(2 * low, replica_batch + 1))
                 if replica_batch % k == 0), None)


def microbatch_choices(pipe: int, replica_batch: int) -> list[int]:
    """Every valid count near ``pipe, 2 pipe, 4 pipe`` (`_near`) for a replica batch.

    When none is valid, the largest divisor of the replica batch that is ``<= pipe``
    (at least 1), so every (pipe, data) keeps one schedule.
    """
    valid = {_near(pipe, replica_batch, f) for f in MICROBATCH_FACTORS} - {None}
    if valid:
        return sorted(valid)
    return [max(k for k in range(1, min(pipe, replica_batch) + 1) if replica_batch % k == 0)]


def default_microbatches(pipe: int, replica_batch: int) -> int:
    """One count per (pipe, data): near ``2 pipe`` if valid, else near ``pipe``, else
    near ``4 pipe`` (`_near`), else the fallback of `microbatch_choices`.

    More microbatches shrink the GPipe bubble ``(p-1)/(M+p-1)`` (Huang et al. 2019) but
    add ticks of per-stage latency and cut every matmul smaller; ``2 pipe`` takes the
    bubble below a third while keeping microbatches large. On simulated CPU devices
    (GPT tiny, B=32, every shape timed 25 steps) it was the fastest of p, 2p, 4p for 4 of
    6 (pipe, data) pairs and never the slowest, where ``pipe`` was the slowest for 5.
    Which count wins depends on the hardware, so ``microbatches="all"`` lets the search
    measure all three. One stage has no bubble to hide: ``pipe == 1`` gets 1.
    """
    if pipe == 1:
        return 1
    for factor in (2, 1, 4):
        count = _near(pipe, replica_batch, factor)
        if count is not None:
            return count
    return microbatch_choices(pipe, replica_batch)[0]


def _microbatch_options(pipe: int, replica_batch: int, microbatches: MicrobatchChoice) -> list[int]:
    if microbatches is None:
        return [default_microbatches(pipe, replica_batch)]
    if microbatches == "all":
        return microbatch_choices(pipe, replica_batch)
    if isinstance(microbatches, str):
        raise InvalidArgument(
            f"microbatches must be None, 'all' or a list of ints, got {microbatches!r}")
    return sorted({int(m) for m in microbatches if m >= 1 and replica_batch % m == 0})


def repeat_choices(pipe: int, microbatches: int, num_layers: int,
                   repeats: RepeatChoice = "all") -> list[int]:
    """The valid circular-schedule rounds among `repeats` (``"all"``: `REPEAT_CHOICES`;
    None: plain GPipe only), ascending; 1 is always valid."""
    if repeats is None:
        return [1]
    if isinstance(repeats, str) and repeats != "all":
        raise InvalidArgument(f"repeats must be None, 'all' or a list of ints, got {repeats!r}")
    wanted = REPEAT_CHOICES if repeats == "all" else {int(r) for r in repeats}
    return sorted({1} | {r for r in wanted if r > 1 and pipe > 1 and microbatches >= pipe
                         and pipe * r <= num_layers})


def _kind(shape: MeshShape, reference: MeshShape, has_current: bool) -> Kind:
    if shape.data > reference.data:
        return "horizontal"
    if has_current and shape.pipe == reference.pipe:
        return "current"
    return "vertical"


@dataclasses.dataclass(frozen=True)
class SearchSpace:
    """The meshes a search may consider: one object read by `search`, the precompiler and
    the memory check, so the meshes compiled ahead are the ones a search will try.

    Attributes:
      p_min: the fewest pipeline stages the model fits in, or ``"auto"`` (`search` only:
        the smallest pipe width whose compiled step fits `memory_budget`).
      max_pipe: largest pipe width to consider (None: no bound but the devices).
      microbatches: None (one count per shape, `default_microbatches`), ``"all"``, or the
        counts to search.
      repeats: circular-schedule rounds: None (GPipe only), ``"all"``, or a list.
      memory_budget: bytes per device (int or ``"2GiB"``) capping the backend's limit;
        candidates that would not fit are skipped unrun. None: the backend's limit, if any.
    """

    p_min: int | Literal["auto"] = 1
    max_pipe: int | None = None
    microbatches: MicrobatchChoice = None
    repeats: RepeatChoice = None
    memory_budget: str | int | None = None

    def __post_init__(self):
        if self.p_min != "auto" and (not isinstance(self.p_min, int)
                                     or isinstance(self.p_min, bool) or self.p_min < 1):
            raise InvalidArgument(f"p_min must be a positive int or 'auto', got {self.p_min!r}")
        if self.max_pipe is not None and (not isinstance(self.max_pipe, int)
                                          or self.max_pipe < 1):
            raise InvalidArgument(f"max_pipe must be a positive int or None, got "
                                  f"{self.max_pipe!r}")
        if isinstance(self.p_min, int) and self.max_pipe is not None \
                and self.max_pipe < self.p_min:
            raise InvalidArgument(f"max_pipe={self.max_pipe} is below p_min={self.p_min}: "
                                  "raise max_pipe")
        for name in ("microbatches", "repeats"):  # lists kept hashable and immutable
            value = getattr(self, name)
            if isinstance(value, str) and value != "all":
                raise InvalidArgument(f"{name} must be None, 'all' or a list of ints, got "
                                      f"{value!r}")
            if value is not None and not isinstance(value, str):
                object.__setattr__(self, name, tuple(int(v) for v in value))

    def candidates(self, n_devices: int, *, num_layers: int, global_batch: int,
                   current: MeshShape | None = None,
                   p_min: int | None = None) -> list[Candidate]:
        """`candidates` over this space (`p_min`: the resolved width when it is "auto")."""
        return candidates(n_devices, **self._rule(num_layers, global_batch, current, p_min))

    def ruled_out(self, n_devices: int, *, num_layers: int, global_batch: int,
                  current: MeshShape | None = None, p_min: int | None = None) -> list[RuledOut]:
        """`ruled_out` over this space (`p_min`: the resolved width when it is "auto")."""
        return ruled_out(n_devices, **self._rule(num_layers, global_batch, current, p_min))

    def _rule(self, num_layers, global_batch, current, p_min) -> dict:
        """The keywords of `candidates` / `ruled_out` for this space."""
        p_min = self.p_min if p_min is None else p_min
        if p_min == "auto":
            raise InvalidArgument("SearchSpace(p_min='auto') must be resolved first "
                                  "(search does it from the memory budget)")
        return dict(p_min=p_min, num_layers=num_layers, global_batch=global_batch,
                    current=current, max_pipe=self.max_pipe, microbatches=self.microbatches,
                    repeats=self.repeats)


def require_devices(n_devices: int, p_min: int) -> None:
    """Raise `InsufficientDevices` (saying how many are needed) when `n_devices < p_min`."""
    if n_devices < p_min:
        raise InsufficientDevices(
            f"p_min={p_min} needs at least {p_min} devices, only {n_devices} available: "
            f"add {p_min - n_devices} device(s) or lower p_min")


def candidates(n_devices: int, *, p_min: int, num_layers: int, global_batch: int,
               current: MeshShape | None = None, max_pipe: int | None = None,
               microbatches: MicrobatchChoice = None,
               repeats: RepeatChoice = None) -> list[Candidate]:
    """The shapes worth a try-run on `n_devices` devices, in a deterministic order.

    Args:
      n_devices: devices available now.
      p_min: fewest pipeline stages at which one stage fits a device.
      num_layers: layers of the model (no pipe width above it).
      global_batch: examples per step, fixed across meshes.
      current: the shape running now, if any; it is always included (re-fitted to
        `n_devices`) while valid, and caps the data axis when `n_devices % p_min != 0`.
      max_pipe: largest pipe width to consider.
      microbatches: None (one count per shape, `default_microbatches`), ``"all"`` (every
        valid count of `microbatch_choices`), or the counts to search.
      repeats: circular-schedule rounds to try for each (pipe, data, microbatches): None
        (plain GPipe only), ``"all"`` (`REPEAT_CHOICES`), or a list (`repeat_choices`).

    Returns:
      Candidates sorted by (pipe, data, microbatches, repeats), without duplicates; empty
      when no shape is valid (e.g. ``p_min > num_layers``).

    Raises:
      InsufficientDevices: `n_devices < p_min` (no mesh can hold one model copy).
      InvalidArgument: nonsensical arguments (non-positive counts).
    """
    return _scan(n_devices, p_min=p_min, num_layers=num_layers, global_batch=global_batch,
                 current=current, max_pipe=max_pipe, microbatches=microbatches,
                 repeats=repeats)[0]


def ruled_out(n_devices: int, *, p_min: int, num_layers: int, global_batch: int,
              current: MeshShape | None = None, max_pipe: int | None = None,
              microbatches: MicrobatchChoice = None,
              repeats: RepeatChoice = None) -> list[RuledOut]:
    """Why `candidates` (same arguments) leaves meshes out: one `RuledOut` per pipe
    width range below p_min or above the layer count or `max_pipe`, and one per pipe width
    whose data axis is narrower than its devices allow (the global batch or the microbatch
    counts do not split; the vertical-only rule). Empty when every device count is tried.
    """
    return _scan(n_devices, p_min=p_min, num_layers=num_layers, global_batch=global_batch,
                 current=current, max_pipe=max_pipe, microbatches=microbatches,
                 repeats=repeats)[1]


def _scan(n_devices: int, *, p_min: int, num_layers: int, global_batch: int,
          current: MeshShape | None, max_pipe: int | None, microbatches: MicrobatchChoice,
          repeats: RepeatChoice) -> tuple[list[Candidate], list[RuledOut]]:
    """(the candidates, what is ruled out and why): the rule, in one pass."""
    for name, value in (("n_devices", n_devices), ("p_min", p_min),
                        ("num_layers", num_layers), ("global_batch", global_batch)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise InvalidArgument(f"{name} must be a positive int, got {value!r}")
    require_devices(n_devices, p_min)
    if max_pipe is not None and max_pipe < p_min:
        raise InvalidArgument(f"max_pipe={max_pipe} is below p_min={p_min}: raise max_pipe")
    reference = current if current is not None else MeshShape(p_min, 1)
    refit = _refit(current, n_devices, p_min=p_min, num_layers=num_layers,
                   global_batch=global_batch, max_pipe=max_pipe)
    data_cap = n_devices if n_devices % p_min == 0 else reference.data
    top = min(n_devices, num_layers, n_devices if max_pipe is None else max_pipe)
    ruled = _pipe_widths_ruled_out(n_devices, p_min, num_layers, max_pipe)

    found: dict[MeshShape, Kind] = {}
    for pipe in range(p_min, top + 1):
        if data_cap < n_devices // pipe:
            ruled.append(RuledOut(f"{pipe}x{n_devices // pipe}", (
                f"{n_devices} devices is not a multiple of p_min {p_min}, so only the pipe "
                f"axis may change: the data axis stays at most {data_cap}")))
        misses: dict[int, str] = {}  # data -> why not
        for data in range(min(data_cap, n_devices // pipe), 0, -1):
            if global_batch % data:
                misses[data] = "batch"
                continue
            counts = _microbatch_options(pipe, global_batch // data, microbatches)
            if microbatches is None and refit is not None and (pipe, data) == (
                    refit.pipe, refit.data):
                if repeats is None:
                    break  # the current schedule stands for this (pipe, data)
                counts = [refit.microbatches]  # its count stands; its rounds are searched
            if counts:  # the widest data axis with a valid schedule
                for m in counts:
                    for r in repeat_choices(pipe, m, num_layers, repeats):
                        shape = MeshShape(pipe, data, m, r)
                        found[shape] = _kind(shape, reference, current is not None)
                break
            misses[data] = "microbatches"
        else:
            data = 0  # no valid data axis at all
        ruled += _data_axes_ruled_out(pipe, misses, data, n_devices, global_batch,
                                      microbatches)
    if refit is not None:
        found[refit] = "current"
    return [Candidate(shape, kind) for shape, kind in sorted(found.items())], ruled


def _pipe_widths_ruled_out(n_devices: int, p_min: int, num_layers: int,
                           max_pipe: int | None) -> list[RuledOut]:
    """Pipe widths 1..n_devices that are no candidate, in runs of the same reason."""
    def why(pipe: int) -> str | None:
        if pipe < p_min:
            return f"fewer stages than p_min {p_min}"
        if pipe > num_layers:
            return f"more stages than the model's {num_layers} layers"
        if max_pipe is not None and pipe > max_pipe:
            return f"more stages than max_pipe {max_pipe}"
        return None

    runs: list[tuple[int, int, str]] = []  # (first, last, reason)
    for pipe in range(1, n_devices + 1):
        reason = why(pipe)
        if reason is None:
            continue
        if runs and runs[-1][2] == reason and runs[-1][1] == pipe - 1:
            runs[-1] = (runs[-1][0], pipe, reason)
        else:
            runs.append((pipe, pipe, reason))
    return [RuledOut(f"pipe {a}" if a == b else f"pipe {a}-{b}", reason)
            for a, b, reason in runs]


def _data_axes_ruled_out(pipe: int, misses: dict[int, str], chosen: int, n_devices: int,
                         global_batch: int, microbatches: MicrobatchChoice) -> list[RuledOut]:
    """One line per reason the data axis of `pipe` is narrower than tried (`chosen`: the
    data axis kept, 0 when none was)."""
    instead = (f"{pipe}x{chosen} ({pipe * chosen} of {n_devices} devices) is tried instead"
               if chosen else f"no data axis works, so no {pipe}-stage mesh is tried")
    out = []
    for kind in ("batch", "microbatches"):
        datas = [d for d, k in misses.items() if k == kind]
        if not datas:
            continue
        replicas = ", ".join(map(str, datas[:-1])) + (" or " if len(datas) > 1 else "") \
            + f"{datas[-1]} replica{'s' if len(datas) > 1 or datas[-1] > 1 else ''}"
        why = (f"global batch {global_batch} does not split into {replicas}"
               if kind == "batch" else f"with {replicas} no microbatch count of "
               f"{list(microbatches) if microbatches else microbatches} splits the replica batch")
        out.append(RuledOut(", ".join(f"{pipe}x{d}" for d in datas), f"{why}: {instead}"))
    return out


def _refit(current: MeshShape | None, n_devices: int, *, p_min: int, num_layers: int,
           global_batch: int, max_pipe: int | None) -> MeshShape | None:
    """The current pipe width with the widest valid data axis <= the current one (its
    schedule kept: a 1f1b mesh is never re-fitted as GPipe)."""
    if current is None or current.pipe < p_min or current.pipe > num_layers:
        return None
    if max_pipe is not None and current.pipe > max_pipe:
        return None
    for data in range(min(current.data, n_devices // current.pipe), 0, -1):
        replica = global_batch // data
        if global_batch % data:
            continue
        m = current.microbatches
        if replica % m:
            m = default_microbatches(current.pipe, replica)
        r = current.repeats if current.repeats in repeat_choices(
            current.pipe, m, num_layers, [current.repeats]) else 1
        return MeshShape(current.pipe, data, m, r,
                         schedule=current.schedule if r == 1 else "gpipe")
    return None
