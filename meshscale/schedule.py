"""Which layers each pipeline stage holds, and what each stage does at each tick.

Pure arithmetic over (layers, pipe, repeats, microbatches), shared by the pipeline (its
layer tables and tick rules), the sharding rule (whether the layer axis splits evenly)
and the benchmarks (counting executed and idle stage-ticks). Nothing here touches JAX.

**The split.** The ``L`` layers are cut into ``G = pipe * repeats`` contiguous *groups*
whose sizes differ by at most one (the first ``L % G`` groups get the extra layer).
Group ``g = k * pipe + s`` runs on stage ``s`` in round ``k``: with ``repeats == 1``
stage ``s`` holds one contiguous range of layers (uneven when ``pipe`` does not divide
``L``); with ``repeats = r`` it holds ``r`` ranges, ``pipe`` groups apart (the circular
schedule of MaxText and praxis, Narayanan et al. 2021's "interleaved" stages). Balanced
by layer count because that is the cost: embedding and head run outside the pipeline on
every device (`meshscale.pipeline`), and every stacked unit has the same shapes and
computation (`meshscale.model.stack_layers` stacks whole `LayerPattern` periods), so a
stage's time is its layer count times one unit's. Ticks are lockstep (each ends in a
``ppermute``), so the step time follows the largest group, ``ceil(L / G)`` layers; a
stage with fewer layers idles for the difference (`padding_slots`).

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
from meshscale.mesh import MeshShape

PADDING = -1  # the layer index of a slot that holds no layer


def check(shape: MeshShape, num_layers: int) -> None:
    """Raise (one line, naming the fix) unless `shape`'s schedule fits `num_layers`."""
    p, r = shape.pipe, shape.repeats
    if p > num_layers:
        raise InvalidMeshShape(
            f"pipe={p} exceeds num_layers={num_layers}: every stage needs a layer; choose "
            f"pipe <= {num_layers}")
    if r > 1 and p == 1:
        raise InvalidMeshShape(
            f"repeats={r} needs pipe > 1 (one stage has no bubble to shrink): use repeats=1")
    if p * r > num_layers:
        raise InvalidMeshShape(
            f"pipe * repeats = {p} * {r} exceeds num_layers={num_layers}: every layer group "
            f"needs a layer; choose repeats <= {num_layers // p}")
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

    @functools.cached_property
    def group_sizes(self) -> tuple[int, ...]:
        """Layers in group ``g = round * pipe + stage``; contiguous, in layer order."""
        base, extra = divmod(self.num_layers, self.groups)
        return tuple(base + (g < extra) for g in range(self.groups))

    @property
    def slots(self) -> int:
        """Layer slots per group: the largest group (smaller groups are padded)."""
        return max(self.group_sizes)

    @property
    def layer_major(self) -> bool:
        """Stage ``s`` holds layers ``[s L/p, (s+1) L/p)``: the stack splits over ``pipe``
        as it is, so no stage-major copy of the parameters is needed."""
        return self.repeats == 1 and self.num_layers % self.pipe == 0

    @functools.cached_property
    def slot_layers(self) -> np.ndarray:
        """``[pipe, repeats, slots]`` int32: the layer in each slot, or `PADDING`."""
        table = np.full((self.pipe, self.repeats, self.slots), PADDING, np.int32)
        start = 0
        for g, size in enumerate(self.group_sizes):
            k, s = divmod(g, self.pipe)
            table[s, k, :size] = np.arange(start, start + size)
            start += size
        return table

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
        """Layer slots a busy stage skips per step, waiting for the largest group."""
        per_round = self.slots * self.groups - self.num_layers
        return per_round * self.microbatches
