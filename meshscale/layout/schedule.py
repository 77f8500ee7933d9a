"""Which layers each pipeline stage holds, and what each stage does at each tick.

Arithmetic over (layers, pipe, repeats, microbatches), shared by the train state (the
padded stack's length, `rows`), the pipeline (its slot tables and tick rule) and the
benchmarks (counting executed and idle stage-ticks). Nothing here compiles or places.

**The split.** The ``L`` layers are cut into ``G = pipe * repeats`` contiguous *groups*
of ``c = ceil(L / G)`` slots; group ``g`` holds layers ``[g c, min((g + 1) c, L))``, so the
last groups may be short or empty. Group ``g = k * pipe + s`` runs on stage ``s`` in
round ``k``: with ``repeats == 1`` stage ``s`` holds one contiguous range of layers (uneven
when ``pipe`` does not divide ``L``); with ``repeats = r`` it holds ``r`` ranges, ``pipe``
groups apart (the circular schedule of MaxText and praxis; Narayanan et al. 2021's
"interleaved" stages).

Why this split. A stage's cost is its layer count: embedding and head run outside the
pipeline on every device (`meshscale.model.pipeline`), and every stacked unit has the same
shapes and computation (`meshscale.model.contract.stack_layers` stacks whole `LayerPattern`
periods). Ticks are lockstep (each ends in a ``ppermute``), so the step time follows the
largest group and so does the peak memory: ``ceil(L / G)`` layers is the least any split
reaches, and this one reaches it. It is also the one split under which the layer-major
stack, padded with zero rows to ``G c`` (`rows`), splits over ``pipe`` as it is: the
stored parameters are that padded stack (`meshscale.training.trainer`), a GPipe stage's slice of it
is exactly its layers (no per-step relayout), and a checkpoint restores onto any other
split by padding or truncating zero rows. A balanced split (sizes differing by one)
would run no faster and would need a stage-major copy of every parameter. A stage with a
short or empty group passes ``h`` on for the slots it lacks (`padding_slots`).

**The ticks.** Each replica's batch is cut into ``M`` microbatches; work item
``i = k * M + m`` is microbatch ``m`` in round ``k``. Stage ``s`` runs item ``t - s`` at
tick ``t`` (when ``0 <= t - s < r M``), so a step takes ``r M + p - 1`` ticks and each
stage idles ``p - 1`` of them: bubble ``(p - 1) / (r M + p - 1)`` (GPipe's when
``r == 1``). Item ``i`` leaves the last stage at tick ``i + p - 1`` and, for ``k + 1 < r``,
re-enters stage 0 as item ``i + M`` at tick ``i + M``, which is after it left only if
``M >= p``: the circular schedule needs at least as many microbatches as stages.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from meshscale.errors import InvalidMeshShape
from meshscale.layout.mesh import MeshShape

PADDING = -1  # the layer index of a slot that holds no layer


def check(shape: MeshShape, num_layers: int) -> None:
    """Raise (one line, naming the fix) unless `shape`'s schedule fits `num_layers`."""
    p, r = shape.pipe, shape.repeats
    if p > num_layers:
        raise InvalidMeshShape(
            f"pipe={p} exceeds num_layers={num_layers}: more stages than layers cannot run "
            f"faster; choose pipe <= {num_layers}")
    if r > 1 and p == 1:
        raise InvalidMeshShape(
            f"repeats={r} needs pipe > 1 (one stage has no bubble to shrink): use repeats=1")
    if p * r > num_layers:
        raise InvalidMeshShape(
            f"pipe * repeats = {p} * {r} exceeds num_layers={num_layers}: more layer groups "
            f"than layers only add ticks; choose repeats <= {num_layers // p}")
    if r > 1 and shape.microbatches < p:
        raise InvalidMeshShape(
            f"repeats={r} needs microbatches >= pipe={p} (a microbatch must leave the last "
            f"stage before its next round), got microbatches={shape.microbatches}")


@dataclasses.dataclass(frozen=True)
class Schedule:
    """The layer split and tick rule of one mesh shape for a `num_layers`-layer stack."""

    num_layers: int
    pipe: int
    repeats: int = 1
    microbatches: int = 1

    @classmethod
    def of(cls, shape: MeshShape, num_layers: int) -> Schedule:
        check(shape, num_layers)
        return cls(num_layers, shape.pipe, shape.repeats, shape.microbatches)

    @property
    def groups(self) -> int:
        return self.pipe * self.repeats

    @property
    def slots(self) -> int:
        """Layer slots per group: ``ceil(L / G)``, the work of one lockstep tick."""
        return -(-self.num_layers // self.groups)

    @property
    def rows(self) -> int:
        """The padded stack's length, ``G * slots``: the stored block leaves' leading axis
        on this mesh (rows past `num_layers` are zeros)."""
        return self.groups * self.slots

    @property
    def group_sizes(self) -> tuple[int, ...]:
        """Layers in group ``g = round * pipe + stage``; contiguous, in layer order."""
        c, L = self.slots, self.num_layers
        return tuple(max(0, min(c, L - g * c)) for g in range(self.groups))

    @property
    def contiguous(self) -> bool:
        """Each stage's layers are its own slice of the padded stack (``repeats == 1``):
        the stored parameters are what the stages read, with no stage-major copy."""
        return self.repeats == 1

    @functools.cached_property
    def slot_rows(self) -> np.ndarray:
        """``[pipe, repeats, slots]`` int32: the padded-stack row (= layer, when below
        `num_layers`) in each slot; stage ``s`` round ``k`` runs group ``k * pipe + s``."""
        g = np.arange(self.repeats)[None, :] * self.pipe + np.arange(self.pipe)[:, None]
        return (g[:, :, None] * self.slots + np.arange(self.slots)).astype(np.int32)

    @property
    def slot_layers(self) -> np.ndarray:
        """`slot_rows` with the padding rows marked `PADDING`."""
        rows = self.slot_rows
        return np.where(rows < self.num_layers, rows, PADDING).astype(np.int32)

    @functools.cached_property
    def regroup_tables(self) -> tuple[np.ndarray, np.ndarray]:
        """How the circular schedule's groups travel from where they are stored to the
        stage that runs them, in ``pipe`` shifts of ``ceil(r / p)`` rounds each.

        Stored, stage ``s`` holds groups ``s r .. s r + r - 1`` (its slice of the padded
        stack); it runs groups ``k p + s``. In shift ``t``, round ``u``, every stage sends
        one group to stage ``(s + t) % p`` (a permutation: one ``ppermute``). Returns
        ``(send, recv)``, both ``[pipe, shifts, rounds]`` int32: the stored group index
        a stage sends (``repeats``: nothing, a zero group) and the round slot ``k`` the
        group it receives fills (``repeats``: nothing).
        """
        p, r = self.pipe, self.repeats
        rounds = -(-r // p)
        send = np.full((p, p, rounds), r, np.int32)
        recv = np.full((p, p, rounds), r, np.int32)
        for s in range(p):
            for t in range(p):
                dest = (s + t) % p
                mine = [k for k in range(r) if (s * r + k) % p == dest]
                for u, k in enumerate(mine):
                    send[s, t, u] = k
                    recv[dest, t, u] = (s * r + k) // p
        return send, recv

    def stage_layers(self, stage: int) -> list[int]:
        """The layers `stage` holds, in the order it runs them."""
        row = self.slot_layers[stage].ravel()
        return [int(i) for i in row if i != PADDING]

    # -- ticks ------------------------------------------------------------------------
    @property
    def ticks(self) -> int:
        return self.repeats * self.microbatches + self.pipe - 1

    def item(self, tick: int, stage: int) -> int | None:
        """The work item (``round * M + microbatch``) `stage` runs at `tick`, or None."""
        i = tick - stage
        return i if 0 <= i < self.repeats * self.microbatches else None

    def busy(self) -> np.ndarray:
        """``[ticks, pipe]`` bool: which stage runs its layers at which tick."""
        return np.array([[self.item(t, s) is not None for s in range(self.pipe)]
                         for t in range(self.ticks)])

    def idle_stage_ticks(self) -> int:
        """Stage-ticks with no work, counted from the tick table (``p (p - 1)``)."""
        return int((~self.busy()).sum())

    def bubble(self) -> float:
        """The formula: ``(p - 1) / (r M + p - 1)``."""
        return (self.pipe - 1) / self.ticks

    def padding_slots(self) -> int:
        """Layer slots busy stages skip per step (short or empty groups): the work the
        lockstep ticks wait for beyond the layers themselves."""
        return (self.rows - self.num_layers) * self.microbatches

