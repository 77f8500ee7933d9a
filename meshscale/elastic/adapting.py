"""The part of `ElasticTrainer` that looks for a better mesh and moves to it.

Every `SwitchPolicy.check_every` steps the loop polls its resource source; on a change it
saves (always first), searches the `SearchSpace` with try-runs on copies of the live
state, and switches when the decision says so (or when the current mesh lost devices)
by restoring the checkpoint with the new mesh's shardings. A mixin: it reads and sets
the loop's state (`shape`, `devices`, the step log, the checkpointer) and is never used
alone.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import statistics
import time
from collections.abc import Sequence

import jax

from meshscale.data.source import BatchSource
from meshscale.elastic import events
from meshscale.elastic.safety import state_deleted
from meshscale.errors import IncompatibleCheckpoint, InsufficientDevices, InvalidMeshShape
from meshscale.layout.mesh import MeshShape, device_ids
from meshscale.model.contract import Batch
from meshscale.planning import memory
from meshscale.planning.cost import CostModel
from meshscale.planning.precompile import likely_next_counts
from meshscale.planning.search import Baseline, Decision, search
from meshscale.planning.tryrun import LiveState
from meshscale.runtime import distributed
from meshscale.training.trainer import TrainState

log = logging.getLogger("meshscale.elastic.trainer")
_BASELINE_WINDOWS = 2  # clean timing windows a baseline from ordinary steps needs


class Adapting:
    """Search and switch: mixed into `ElasticTrainer`."""

    def _require(self, devices: Sequence[jax.Device]) -> None:
        if len(devices) < self.p_min:
            raise InsufficientDevices(
                f"{len(devices)} devices available, the model needs p_min={self.p_min}: "
                f"wait for at least {self.p_min} devices or lower p_min")

    def _staging_shape(self, devices) -> MeshShape:
        """The smallest valid mesh, to hold the state while the real one is searched.

        With several processes, the smallest on which every process holds a part (a
        process outside the mesh could not even read the step counter).
        """
        for n in range(self.p_min, len(devices) + 1):
            for p in range(self.p_min, n + 1):
                if n % p:
                    continue
                shape = MeshShape(p, n // p, 1)
                try:
                    self.trainer.check(shape, devices)
                except InvalidMeshShape:
                    continue
                if not distributed.idle_processes(devices[:n]):
                    return shape
        raise InsufficientDevices(
            f"no valid mesh of pipe width in [{self.p_min}, {len(devices)}] spans every "
            f"process ({self.trainer.num_layers} layers): add devices or change p_min")

    def check(self, state: TrainState, batch: Batch | BatchSource) -> TrainState:
        """Poll the resource source now; on a change, save, search and maybe switch.

        `batch`: a global batch or the loop's data source (try-runs time real steps with
        global batch `step`; each process puts only the rows each candidate mesh gives it)."""
        devices = self._poll()
        if device_ids(devices) == device_ids(self._granted):
            self._plan_precompile()
            return state
        self._break_window()
        if self._nonfinite is not None:  # handled first (step); the change is seen again
            return state
        self._emit(events.DevicesChanged, before=len(self._granted), after=len(devices),
                   device_ids=list(device_ids(devices)))
        self._save(state, reason="before search")
        with self.ledger.spend("checkpoint"):
            self.checkpointer.wait()  # on disk before anything is tried: a switch restores it
        try:
            self._require(devices)
        finally:
            self._granted = list(devices)
        current_ok = set(device_ids(self.devices)) <= set(device_ids(devices))
        baseline = self.baseline() if current_ok else None
        total = self.switching.total_steps
        remaining = (total - self._step) if total else None
        state, decision = self._search(state, self._tryrun_batches(batch), devices,
                                       baseline=baseline,
                                       current=self.shape if current_ok else None,
                                       remaining_steps=remaining, step=self._step)
        forced = not current_ok
        if decision.best is not None and (decision.switch or forced) \
                and (decision.best.shape, device_ids(devices[: decision.best.shape.num_devices])) \
                != (self.shape, device_ids(self.devices)):
            state = self._switch(state, decision.best.shape, devices,
                                 reason="forced: current mesh lost devices" if forced
                                 else "faster")
        elif forced:
            raise InsufficientDevices(f"the current mesh lost devices and no candidate ran on "
                                      f"{len(devices)} devices: {decision.reason}")
        self._plan_precompile()
        return state

    def _tryrun_batches(self, batch: Batch | BatchSource) -> Sequence[Batch]:
        """The try-runs' batches: `batch`, or a source's global batch at the current step,
        read only when a try-run really steps (not for injected measurements)."""
        return _OnDemand(batch, self._step) if isinstance(batch, BatchSource) else [batch]

    def baseline(self) -> Baseline | None:
        """The current mesh's steady-state samples/s from ordinary steps: the median of the
        last clean timing windows (past warm-up, no save, no background compile), or None
        with fewer than 2 (then the search takes the current mesh's own try-run).

        With several processes every one must call this (the slowest counts), and all get
        the same answer: the window count is agreed too.
        """
        recent = self.step_log.recent
        enough = distributed.broadcast(len(recent) >= _BASELINE_WINDOWS)
        if not enough:
            return None
        mine = statistics.median(recent) if recent else math.nan
        seconds = float(distributed.slowest(mine))
        if not math.isfinite(seconds):  # a process without a clean window: none
            return None
        return Baseline(self.trainer.global_batch / seconds, self.shape.num_devices, self.shape,
                        source="steps")

    def _poll(self) -> list[jax.Device]:
        """The devices granted now; with several processes, process 0's answer."""
        return distributed.agree_devices(self.resources.poll())

    def _search(self, state, batches, devices, *, baseline, current, step: int | None,
                remaining_steps=None) -> tuple[TrainState, Decision]:
        """Search; the state comes back as it went in, unless a try-run needed its memory:
        then it is read back (checkpoint `step`, or fresh when None) onto the mesh it was on."""
        start = time.perf_counter()
        live = LiveState(state, restore=lambda shape, devs: (
            self.trainer.init_state(shape, devs) if step is None
            else self.checkpointer.restore(shape, step=step, devices=devs)))
        quiet = self.precompiler.paused() if self.precompiler else contextlib.nullcontext()
        with quiet, self.ledger.spend("search_tryrun"):  # on cores the compiler leaves alone
            decision = search(self.trainer, live, batches, devices, space=self.space,
                              timing=self.timing, baseline=baseline,
                              threshold=self.switching.threshold, eps=self.switching.eps,
                              measure=self.switching.measure, current=current,
                              remaining_steps=remaining_steps,
                              switch_cost=self._last_switch_cost,
                              cost_model=None if self.switching.measure else self._costs())
        self._save_costs()
        compiled = sum(r.compile_seconds for r in decision.results
                       if math.isfinite(r.compile_seconds))
        self.ledger.move(compiled, "search_tryrun", "search_compile")
        self._emit(events.Search, num_devices=len(devices), decision=decision,
                   seconds=time.perf_counter() - start)
        if live.released:
            state = live.restore(self.shape, self.devices)
            self._emit(events.Restore, reason="the live state was released for a try-run",
                       checkpoint_step=step)
        return state, decision

    def _cost_path(self) -> str | None:
        directory = getattr(self.run_metrics, "directory", None)
        local = directory is not None and "://" not in str(directory)
        return os.path.join(directory, "cost_model.json") if local else None

    def _costs(self) -> CostModel:
        """The run's calibration of the cost model: read once from the run directory (a
        restarted job starts calibrated), shared with the precompiler, kept across
        searches."""
        if getattr(self, "_cost_model", None) is None:
            path = self._cost_path()
            self._cost_model = CostModel.load(path) if path else CostModel()
            if self.precompiler is not None:
                self.precompiler.cost_model = self._cost_model
        return self._cost_model

    def _save_costs(self) -> None:
        path = self._cost_path()
        if path and getattr(self, "_cost_model", None) is not None \
                and jax.process_index() == 0 and os.path.isdir(os.path.dirname(path)):
            self._cost_model.save(path)

    def _switch(self, state: TrainState, shape: MeshShape, devices, *,
                reason: str) -> TrainState:
        """Move `state` onto `shape`: restore the checkpoint written before the search."""
        self.ledger.relabel(str(shape))  # a switch's cost is charged to the mesh it makes
        with self.ledger.spend("switch"):  # a save inside is checkpoint time
            start = time.perf_counter()
            before = self.shape
            step = self._step
            self._break_window()
            latest = self.checkpointer.latest_step()
            on_disk = self.switching.via != "memory" and latest == step
            if not on_disk and distributed.can_place():
                state = self.trainer.place(state, shape, devices)
            elif not on_disk and reason == "start" and latest is None:
                state = self.trainer.init_state(shape, devices)  # fresh, across processes
            else:  # through the checkpoint: exactly this step, never an older one behind it
                if not on_disk:  # across processes, the only way to move the state
                    self._save(state, reason="before switch")
                if not self._fits_beside(state, shape, devices):
                    jax.tree.map(lambda x: x.delete(), state)  # on disk: make room first
                try:
                    state = self.checkpointer.restore(shape, step=step, devices=devices)
                except IncompatibleCheckpoint as e:
                    if not distributed.can_place() or state_deleted(state):
                        raise
                    log.warning("switch: %s; moving the state in memory instead", e)
                    state = self.trainer.place(state, shape, devices)
            self._step_fn = self.trainer.compile_step(shape, devices)
            self._batch_sharding = self.trainer.batch_sharding(shape, devices)  # once per mesh
            self._rows = self.trainer.local_rows(shape, devices)
            self.shape, self.devices = shape, list(devices[: shape.num_devices])
            self._granted = list(devices)
            self.step_log.recent.clear()
            self._since_switch = 0
            cost = time.perf_counter() - start
            if reason != "start":
                self._last_switch_cost = cost
            self._emit(events.Switch, before=str(before) if before else None, after=str(shape),
                       num_devices=shape.num_devices, reason=reason, seconds=cost)
            self._plan_precompile()
            return state

    def _fits_beside(self, state: TrainState, shape: MeshShape, devices) -> bool:
        """Whether `shape`'s state fits on its devices beside the live `state` (True when
        no memory budget is known)."""
        budget = memory.memory_budget(devices, self.space.memory_budget)
        live = LiveState(state).bytes_on(devices[: shape.num_devices])
        return memory.fits(live + self.trainer.state_bytes_per_device(shape), budget)

    def _plan_precompile(self) -> None:
        """Queue the likely next meshes for background compiling (once per situation)."""
        if self.precompiler is None:
            return
        if isinstance(self.precompile_mode, list):
            counts = self.precompile_mode
        else:
            counts = likely_next_counts(len(self._granted), p_min=self.p_min,
                                        max_devices=len(jax.devices()),
                                        announced=self.resources.announced())
        situation = (tuple(counts), device_ids(self._granted), self.shape)
        if situation == self._planned:
            return
        self._planned = situation
        queued = self.precompiler.plan(counts, self._granted, current=self.shape,
                                       current_devices=self.devices)
        if queued:
            self._emit(events.Precompile, counts=list(counts), queued=queued)


class _OnDemand(Sequence):
    """One global batch of a source, read at the first use (try-runs on any mesh get
    every row; `Trainer.put_batch` keeps each process's rows of that mesh)."""

    def __init__(self, source: BatchSource, step: int):
        self._source, self._step, self._batch = source, step, None

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> Batch:
        if index not in (0, -1):
            raise IndexError(index)
        if self._batch is None:
            self._batch = self._source.batch(self._step)
        return self._batch
