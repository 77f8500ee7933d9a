"""`ElasticTrainer`: the loop-facing API that keeps training on the best mesh.

The user's loop calls `init` once and `step` per batch. Every `check_every` steps the
trainer polls its resource source; when the available devices changed it (1) writes a
checkpoint, always first, (2) lists candidate meshes and try-runs them on copies of the
live state, (3) switches only when the decision says so (or when the current mesh lost
devices), by restoring the checkpoint with the new mesh's shardings. The training math
never depends on the mesh (same global batch, same optimizer), so losses with switches
equal those without, to float tolerance.

With several processes (one per host, `meshscale.distributed`) every process runs the
same loop: process 0's device poll is the one that counts, baselines and try-runs count
the slowest process, process 0's decision is everyone's, and only process 0 calls
`on_event` and prints reports. A switch always goes through the checkpoint
(`distributed.can_place`).

Never: change the live state during a search, or touch devices the source did not grant.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import optax
from flax import nnx

from meshscale import distributed, memory
from meshscale import resources as resources_lib
from meshscale.checkpoint import Checkpointer
from meshscale.compile_cache import CompileCache, enable_persistent_cache
from meshscale.errors import IncompatibleCheckpoint, InsufficientDevices, InvalidMeshShape
from meshscale.mesh import MeshShape, device_ids
from meshscale.model import Batch
from meshscale.precompile import Precompiler, likely_next_counts, resolve_mode
from meshscale.search import Baseline, Decision, search
from meshscale.train import Trainer, TrainState
from meshscale.tryrun import LiveState

log = logging.getLogger(__name__)

Event = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class StepRecord:
    step: int
    loss: float
    seconds: float
    samples_per_second: float
    mesh: str
    num_devices: int


class ElasticTrainer:
    """Train a reshardable model on whatever devices `resources` grants, on the best mesh.

    Args:
      model, optimizer, global_batch, example_batch, remat, state_sharding: as for
        `meshscale.Trainer` (`model` may be a constructor).
      checkpoint_dir: Orbax checkpoints (and, by default, JAX's compilation cache) go here.
      p_min: the fewest pipeline stages the model fits in.
      resources: a `meshscale.resources` source, a device list or a count.
      threshold: switch only if the best try-run beats the baseline by more than this.
      check_every: poll `resources` every this many steps.
      total_steps: when given, a switch must also pay back its cost over the steps left.
      switch_via: "checkpoint" (restore with the new shardings; works across hosts) or
        "memory" (`Trainer.place`; one process only: with several, the checkpoint).
        Either way the checkpoint is written first.
      checkpoint_every: also save every this many steps (for resuming after a crash).
      on_event: called with every event as it happens (the CLI prints them); on process 0
        only when the job has several processes.
      precompile: "auto" (on for GPU/TPU, off on CPU), "on", "off", or the device counts
        to prepare for; compiles the next meshes in the background (`meshscale.precompile`).
      precompile_budget: most background compiles per plan.
      search_options: passed to `meshscale.search` (warmup, steps, max_pipe, microbatches,
        eps, memory_budget).
    """

    def __init__(self, model: nnx.Module, optimizer: optax.GradientTransformation, *,
                 global_batch: int, checkpoint_dir: str | os.PathLike, p_min: int,
                 resources: resources_lib.ResourceSource | Sequence[jax.Device] | int,
                 threshold: float = 0.05, check_every: int = 50,
                 total_steps: int | None = None, switch_via: str = "checkpoint",
                 checkpoint_every: int | None = None, max_to_keep: int = 3,
                 example_batch: Batch | None = None, remat: str | bool = "layer",
                 state_sharding: str = "fsdp",
                 compile_cache: CompileCache | None = None, persistent_cache: bool = True,
                 baseline_window: int = 20, on_event: Callable[[Event], None] | None = None,
                 search_options: dict | None = None,
                 precompile: str | Sequence[int] = "auto", precompile_budget: int = 8):
        if switch_via not in ("checkpoint", "memory"):
            raise InvalidMeshShape(
                f"switch_via must be 'checkpoint' or 'memory', got {switch_via!r}")
        if not isinstance(check_every, int) or check_every < 1:
            raise InvalidMeshShape(f"check_every must be a positive int, got {check_every!r}")
        self.trainer = Trainer(model, optimizer, global_batch=global_batch,
                               example_batch=example_batch, remat=remat,
                               state_sharding=state_sharding, cache=compile_cache)
        if not isinstance(p_min, int) or p_min < 1:
            raise InvalidMeshShape(f"p_min must be a positive int, got {p_min!r}")
        if p_min > self.trainer.num_layers:
            raise InvalidMeshShape(
                f"p_min={p_min} is larger than the model's {self.trainer.num_layers} layers: "
                f"a stage needs at least one layer, lower p_min")
        self.p_min = p_min
        self.checkpoint_dir = os.fspath(checkpoint_dir)
        if persistent_cache:
            enable_persistent_cache(os.path.join(self.checkpoint_dir, "jax_cache"))
        self.checkpointer = Checkpointer(os.path.join(self.checkpoint_dir, "state"), self.trainer,
                                         max_to_keep=max_to_keep)
        self.resources = (resources if isinstance(resources, resources_lib.ResourceSource)
                          else resources_lib.Static(resources))
        self.threshold, self.check_every, self.total_steps = threshold, check_every, total_steps
        self.switch_via, self.checkpoint_every = switch_via, checkpoint_every
        self.on_event = on_event
        self.search_options = dict(search_options or {})
        self.shape: MeshShape | None = None
        self.devices: list[jax.Device] = []  # the current mesh's devices
        self._granted: list[jax.Device] = []  # what the source granted at the last poll
        self.history: list[Event] = []
        self.steps: list[StepRecord] = []
        self._step_fn = None
        self._recent = collections.deque(maxlen=baseline_window)  # step seconds on this mesh
        self._since_switch = 0
        self._last_switch_cost: float | None = None
        self.precompile_mode = resolve_mode(precompile)
        self.precompiler = (None if self.precompile_mode == "off" else Precompiler(
            self.trainer, p_min=p_min, search_options=self.search_options,
            budget=precompile_budget))
        self._planned: tuple | None = None

    # -- events -----------------------------------------------------------------------
    def _emit(self, kind: str, **data) -> Event:
        event = {"event": kind, "time": time.time(),
                 "step": self.steps[-1].step if self.steps else None, **data}
        self.history.append(event)
        log.info("%s %s", kind, {k: v for k, v in data.items() if k != "decision"})
        if self.on_event is not None and distributed.is_main():
            self.on_event(event)
        return event

    # -- start-up ---------------------------------------------------------------------
    def init(self, example_batch: Batch) -> TrainState:
        """The state to train from: the latest checkpoint if any, else fresh; on the best mesh.

        Refuses to start (`InsufficientDevices`) with fewer devices than `p_min`.
        """
        if not self.trainer.knows_batch:
            self.trainer.set_example_batch(example_batch)
        devices = self._poll()
        self._require(devices)
        staging = self._staging_shape(devices)
        latest = self.checkpointer.latest_step()
        if latest is not None:
            state = self.checkpointer.restore(staging, devices=devices)
            restored = int(state.step)
            self._emit("resume", checkpoint_step=restored, num_devices=len(devices))
        else:
            state = self.trainer.init_state(staging, devices)
            self._emit("start", num_devices=len(devices))
        self.shape, self.devices = staging, devices[: staging.num_devices]
        step = int(state.step) if latest is not None else None
        state, decision = self._search(state, [example_batch], devices, baseline=None,
                                       current=None, step=step)
        best = decision.best
        if best is None:
            raise InsufficientDevices(f"no mesh could run on {len(devices)} devices: "
                                      f"{decision.reason}")
        state = self._switch(state, best.shape, devices, reason="start")
        return state

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
                if n % p or self.trainer.num_layers % p:
                    continue
                shape = MeshShape(p, n // p, 1)
                try:
                    self.trainer.check(shape, devices)
                except InvalidMeshShape:
                    continue
                if not distributed.idle_processes(devices[:n]):
                    return shape
        raise InsufficientDevices(
            f"no mesh of pipe width in [{self.p_min}, {len(devices)}] divides "
            f"{self.trainer.num_layers} layers and spans every process: add devices or "
            "change p_min")

    # -- the loop ---------------------------------------------------------------------
    def step(self, state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
        """One training step on the current mesh; every `check_every` steps, adapt.

        The state passed in is consumed (its buffers are donated to the step).
        """
        if self._step_fn is None:
            raise RuntimeError("call ElasticTrainer.init(example_batch) before step()")
        start = time.perf_counter()
        placed = self.trainer.put_batch(batch, self.shape, self.devices)
        state, metrics = self._step_fn(state, placed)
        loss = float(metrics["loss"])  # waits for the step: the timing is real
        seconds = time.perf_counter() - start
        self._since_switch += 1
        if self._since_switch > 2:  # the first steps on a new mesh are warm-up
            self._recent.append(seconds)
        record = StepRecord(int(state.step), loss, seconds, self.trainer.global_batch / seconds,
                            str(self.shape), self.shape.num_devices)
        self.steps.append(record)
        metrics = {"loss": loss, "seconds": seconds, "mesh": str(self.shape),
                   "samples_per_second": record.samples_per_second}
        if self.checkpoint_every and record.step % self.checkpoint_every == 0:
            self._save(state, reason="periodic")
        if record.step % self.check_every == 0:
            state = self.check(state, batch)
        return state, metrics

    def check(self, state: TrainState, batch: Batch) -> TrainState:
        """Poll the resource source now; on a change, save, search and maybe switch."""
        devices = self._poll()
        if device_ids(devices) == device_ids(self._granted):
            self._plan_precompile()
            return state
        self._emit("devices_changed", before=len(self._granted), after=len(devices),
                   device_ids=list(device_ids(devices)))
        self._save(state, reason="before search")
        try:
            self._require(devices)
        finally:
            self._granted = list(devices)
        current_ok = set(device_ids(self.devices)) <= set(device_ids(devices))
        baseline = self.baseline() if current_ok else None
        remaining = (self.total_steps - int(state.step)) if self.total_steps else None
        state, decision = self._search(state, [batch], devices, baseline=baseline,
                                       current=self.shape if current_ok else None,
                                       remaining_steps=remaining, step=int(state.step))
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

    def baseline(self) -> Baseline | None:
        """The current mesh's steady-state samples/s from ordinary steps (None if too few)."""
        if len(self._recent) < 3:
            return None
        seconds = float(distributed.slowest(statistics.median(self._recent)))
        return Baseline(self.trainer.global_batch / seconds, self.shape.num_devices, self.shape)

    def _poll(self) -> list[jax.Device]:
        """The devices granted now; with several processes, process 0's answer."""
        return distributed.agree_devices(self.resources.poll())

    # -- pieces -----------------------------------------------------------------------
    def _save(self, state: TrainState, *, reason: str) -> None:
        step = int(state.step)
        start = time.perf_counter()
        if not self.checkpointer.save(state, shape=self.shape):
            return  # this step is on disk already (a damaged copy is replaced)
        self.checkpointer.wait()
        self._emit("checkpoint", checkpoint_step=step, reason=reason,
                   seconds=time.perf_counter() - start)

    def _search(self, state, batches, devices, *, baseline, current, step: int | None,
                remaining_steps=None) -> tuple[TrainState, Decision]:
        """Search; the state comes back as it went in, unless a try-run needed its memory:
        then it is read back (checkpoint `step`, or fresh when None) onto the mesh it was on."""
        start = time.perf_counter()
        live = LiveState(state, restore=lambda shape, devs: (
            self.trainer.init_state(shape, devs) if step is None
            else self.checkpointer.restore(shape, step=step, devices=devs)))
        decision = search(self.trainer, live, batches, devices, p_min=self.p_min,
                          baseline=baseline, threshold=self.threshold, current=current,
                          remaining_steps=remaining_steps, switch_cost=self._last_switch_cost,
                          **self.search_options)
        self._emit("search", num_devices=len(devices), decision=decision,
                   seconds=time.perf_counter() - start)
        if live.released:
            state = live.restore(self.shape, self.devices)
            self._emit("restore", reason="the live state was released for a try-run",
                       checkpoint_step=step)
        return state, decision

    def _switch(self, state: TrainState, shape: MeshShape, devices, *,
                reason: str) -> TrainState:
        """Move `state` onto `shape`: restore the checkpoint written before the search."""
        start = time.perf_counter()
        before = self.shape
        step = int(state.step)
        latest = self.checkpointer.latest_step()
        on_disk = self.switch_via != "memory" and latest == step
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
        self.shape, self.devices = shape, list(devices[: shape.num_devices])
        self._granted = list(devices)
        self._recent.clear()
        self._since_switch = 0
        cost = time.perf_counter() - start
        if reason != "start":
            self._last_switch_cost = cost
        self._emit("switch", before=str(before) if before else None, after=str(shape),
                   num_devices=shape.num_devices, reason=reason, seconds=cost)
        self._plan_precompile()
        return state

    def _fits_beside(self, state: TrainState, shape: MeshShape, devices) -> bool:
        """Whether `shape`'s state fits on its devices beside the live `state` (True when
        no memory budget is known)."""
        budget = memory.memory_budget(devices, self.search_options.get("memory_budget"))
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
            self._emit("precompile", counts=list(counts), queued=queued)

    def report(self) -> None:
        """Print the history as rich tables (decisions, switches, time per mesh); process 0
        only."""
        from meshscale.report import print_history

        if distributed.is_main():
            print_history(self)


def state_deleted(state: TrainState) -> bool:
    return any(x.is_deleted() for x in jax.tree.leaves(state))
