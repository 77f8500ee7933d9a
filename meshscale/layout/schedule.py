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
stored parameters are that padded stack (`meshscale.training.trainer`), a GPipe stage's
slice of it is exactly its layers (no per-step relayout; a circular mesh cuts the same
rows into ``[repeats, pipe * slots]``, `meshscale.layout.stacking`), and a checkpoint
restores onto any other split by padding or truncating zero rows. A balanced split
(sizes differing by one) would run no faster and would need a stage-major copy of every
parameter. A stage with a short or empty group passes ``h`` on for the slots it lacks
(`padding_slots`).

**The ticks.** Each replica's batch is cut into ``M`` microbatches; work item
``i = k * M + m`` is microbatch ``m`` in round ``k``. Stage ``s`` runs item ``t - s`` at
tick ``t`` (when ``0 <= t - s < r M``), so a step takes ``r M + p - 1`` ticks and each
stage idles ``p - 1`` of them: bubble ``(p - 1) / (r M + p - 1)`` (GPipe's when
``r == 1``). Item ``i`` leaves the last stage at tick ``i + p - 1`` and, for ``k + 1 < r``,
re-enters stage 0 as item ``i + M`` at tick ``i + M``, which is after it left only if
``M >= p``: the circular schedule needs at least as many microbatches as stages.

**Slot tables** (`SlotTable`): GPipe, 1F1B and a zero-bubble schedule in one unit, the
*slot* (one F, B = input-gradient or W = weight-gradient pass of a stage on one
microbatch; every slot ends in the ``ppermute``s), so that their bubbles compare:
GPipe and 1F1B ``(p - 1) / (M + p - 1)``, 1F1B holding ``p - s`` stage inputs instead of
``M``; zero-bubble ``(p - 1) / (3 M + p - 1)`` for ``M >= p``.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from meshscale.errors import InvalidMeshShape
from meshscale.layout.mesh import SCHEDULES, MeshShape

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
        """Each stage's layers are one range of the padded stack (``repeats == 1``); a
        circular stage holds ``repeats`` ranges (`meshscale.layout.stacking`)."""
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



# -- slot tables: GPipe, 1F1B and zero-bubble in one unit ------------------------------
IDLE = -1  # a table entry with no microbatch


@dataclasses.dataclass(frozen=True, eq=False)
class SlotTable:
    """What every stage does in every *slot* of one step: ``forward``, ``backward`` and
    ``weight`` are ``[slots, pipe]`` int32, the microbatch whose F, B or W the stage runs
    (`IDLE`: none); a stage runs at most one of the three in a slot.

    The unit. F is a stage's forward of one microbatch; B its input-gradient backward
    (the cotangent the previous stage needs); W its weight-gradient backward. Each costs
    one slot, as in Qi et al. 2024 ("Zero Bubble Pipeline Parallelism", T_F = T_B = T_W):
    a whole backward (autodiff's, roughly twice a forward) is B + W, two slots. Every slot
    ends in two ``ppermute``s (F's output to stage ``s + 1``, B's cotangent to ``s - 1``)
    and is lockstep: what a stage sends in slot ``u`` it can use from slot ``u + 1``. The
    head runs between the slot of a microbatch's last F and the last stage's B of it.
    A step is ``slots`` slots; each stage has ``3 M`` work slots; bubble = idle
    stage-slots / all stage-slots, the same ratio GPipe's ``(p - 1) / (M + p - 1)`` is.
    """

    kind: str
    pipe: int
    microbatches: int
    forward: np.ndarray
    backward: np.ndarray
    weight: np.ndarray

    @property
    def slots(self) -> int:
        return self.forward.shape[0]

    def busy(self) -> np.ndarray:
        """``[slots, pipe]`` bool: the stage runs F, B or W in the slot."""
        return (self.forward != IDLE) | (self.backward != IDLE) | (self.weight != IDLE)

    def idle_stage_slots(self) -> int:
        return int((~self.busy()).sum())

    def counted_bubble(self) -> float:
        """Idle stage-slots over all stage-slots, counted from the table."""
        return self.idle_stage_slots() / (self.slots * self.pipe)

    def when(self, which: str) -> np.ndarray:
        """``[pipe, M]``: the slot in which each stage runs `which` ("forward",
        "backward", "weight") of each microbatch (-1 if never)."""
        table = getattr(self, which)
        out = np.full((self.pipe, self.microbatches), -1, np.int64)
        u, s = np.nonzero(table != IDLE)
        out[s, table[u, s]] = u
        return out

    def held(self, start: np.ndarray, end: np.ndarray) -> np.ndarray:
        """``[slots, pipe]``: how many microbatches a stage holds in each slot, holding
        each from slot ``start[s, m]`` to ``end[s, m]`` (``[pipe, M]``), both counted."""
        u = np.arange(self.slots)[:, None, None]
        return ((start[None] <= u) & (u <= end[None])).sum(-1)

    def in_flight(self) -> np.ndarray:
        """``[slots, pipe]``: microbatches a stage holds the input of during each slot:
        its F has run (this slot or before) and its W has not finished (W reads it)."""
        return self.held(self.when("forward"), self.when("weight"))

    def rings(self) -> tuple[int, int, int]:
        """Buffers an executor needs per stage (the most held at once; each set is
        consecutive microbatches, so buffer ``m % size`` is free): stage inputs (from
        their arrival to B), cotangents (`cotangents_waiting`) and what W reads (from B
        to W)."""
        f, b, w = self.when("forward"), self.when("backward"), self.when("weight")
        arrive = np.concatenate([f[:1], f[:-1]])  # stage 0 reads its input at its F
        return (int(self.held(arrive, b).max()), int(self.cotangents_waiting().max()),
                int(self.held(b, w).max()))


    def cotangents_waiting(self) -> np.ndarray:
        """``[slots, pipe]``: cotangents a stage holds in each slot, from the slot that
        sends one (stage ``s + 1``'s B; for the last stage, its F: the head runs after
        it) to the stage's own B, both counted."""
        f, b = self.when("forward"), self.when("backward")
        return self.held(np.concatenate([b[1:], f[-1:]]), b)


def _table(kind: str, p: int, m: int, slots: int, ops: dict) -> SlotTable:
    arrays = {k: np.full((slots, p), IDLE, np.int32) for k in ("forward", "backward", "weight")}
    for (which, s, mb), u in ops.items():
        arrays[which][u, s] = mb
    return SlotTable(kind, p, m, **arrays)


def gpipe_slots(pipe: int, microbatches: int) -> SlotTable:
    """GPipe in slots: ``M + p - 1`` forward ticks (F of ``m`` on stage ``s`` at
    ``m + s``), then autodiff's backward, the ticks reversed, each a B and a W slot."""
    p, m = pipe, microbatches
    ticks = m + p - 1
    ops = {}
    for s in range(p):
        for mb in range(m):
            ops["forward", s, mb] = mb + s
            j = ticks - 1 - (mb + s)  # the backward tick that reverses forward tick mb + s
            ops["backward", s, mb] = ticks + 2 * j
            ops["weight", s, mb] = ticks + 2 * j + 1
    return _table("gpipe", p, m, 3 * ticks, ops)


def one_f_one_b(pipe: int, microbatches: int) -> SlotTable:
    """1F1B (Narayanan et al. 2021, PipeDream-Flush) in lockstep slots, in closed form:
    F of ``m`` on stage ``s`` at slot ``3 m + s``, B at ``3 m + 3 p - 2 - 2 s``, W right
    after. Slots ``= s, s + 1, s + 2 (mod 3)`` hold F, B and W, so they never collide.

    Warm-up: stage ``s`` runs ``p - s`` forwards (every third slot) before its first B
    reaches it; steady: F, B, W every three slots; cool-down: B and W only. F moves one
    stage a slot, B one stage every two (the W between). Stage ``s`` holds a microbatch
    from F to W, ``3 (p - s)`` slots: ``p - s`` in flight, whatever ``M``. A step is
    ``3 (M + p - 1)`` slots: bubble ``(p - 1) / (M + p - 1)``, GPipe's."""
    p, m = pipe, microbatches
    ops = {}
    for s in range(p):
        for mb in range(m):
            ops["forward", s, mb] = 3 * mb + s
            ops["backward", s, mb] = 3 * mb + 3 * p - 2 - 2 * s
            ops["weight", s, mb] = 3 * mb + 3 * p - 1 - 2 * s
    return _table("1f1b", p, m, 3 * (m + p - 1), ops)


def zb_cap(pipe: int) -> int:
    """The zero-bubble table's in-flight cap: ``p + floor((p + 1) / 3)`` microbatches a
    stage may hold (at ``p``, 1F1B's stage 0, up to ``~p/2`` more idle slots remain)."""
    return pipe + (pipe + 1) // 3


def zero_bubble(pipe: int, microbatches: int, cap: int | None = None) -> SlotTable:
    """A zero-bubble table (ZB-H1's rule, Qi et al. 2024, in lockstep slots): W is
    deferred into slots the stage would idle. Built slot by slot: each stage runs a B if
    its cotangent has arrived, else the next F if its input has arrived and fewer than
    `cap` (`zb_cap`) microbatches are in flight, else its oldest pending W, else idles.

    Lockstep allows this much: the first F reaches stage ``s`` at slot ``s`` and the last
    B leaves it ``p - 1 - s`` slots before the end, so every stage idles at least
    ``p - 1`` slots; the table reaches that for ``M >= p`` (checked for ``p <= 12``,
    ``M <= 6 p + 2``): bubble ``(p - 1 + max(0, p - M)) / (3 M + p - 1 + max(0, p - M))``.
    """
    p, m = pipe, microbatches
    cap = zb_cap(p) if cap is None else cap
    done: dict = {}
    nf, nb, nw = [0] * p, [0] * p, [0] * p
    u = 0

    def ready(key, u):  # sent before slot u
        return key in done and done[key] < u

    while sum(nw) < p * m:
        for s in range(p):
            b, f = nb[s], nf[s]
            if b < f and ready(("forward", s, b) if s == p - 1 else ("backward", s + 1, b), u):
                done["backward", s, b], nb[s] = u, b + 1
            elif f < m and f - nw[s] < cap and (s == 0 or ready(("forward", s - 1, f), u)):
                done["forward", s, f], nf[s] = u, f + 1
            elif nw[s] < nb[s]:
                done["weight", s, nw[s]], nw[s] = u, nw[s] + 1
        u += 1
    return _table("zb", p, m, u, done)


def slot_table(kind: str, pipe: int, microbatches: int) -> SlotTable:
    """The `kind` schedule's table (`SCHEDULES`)."""
    make = {"gpipe": gpipe_slots, "1f1b": one_f_one_b, "zb": zero_bubble}
    if kind not in make:
        raise InvalidMeshShape(f"schedule must be one of {', '.join(SCHEDULES)}, got {kind!r}")
    return make[kind](pipe, microbatches)


def bubble_formula(kind: str, pipe: int, microbatches: int) -> float:
    """The bubble of `kind`'s table in closed form (`SlotTable.counted_bubble`)."""
    p, m = pipe, microbatches
    if kind in ("gpipe", "1f1b"):
        return (p - 1) / (m + p - 1)
    idle = p - 1 + max(0, p - m)
    return idle / (3 * m + idle)
