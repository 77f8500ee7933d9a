"""`ElasticTrainer`: the loop-facing API that keeps training on the best mesh.

The user's loop calls `init` once and `step` per batch. Every `check_every` steps the
trainer polls its resource source; when the available devices changed it (1) writes a
checkpoint, always first, (2) lists candidate meshes and try-runs them on copies of the
live state, (3) switches only when the decision says so (or when the current mesh lost
devices), by restoring the checkpoint with the new mesh's shardings. The training math
never depends on the mesh (same global batch, same optimizer), so losses with switches
equal those without, to float tolerance.

With several processes (one per host, `meshscale.runtime.distributed`) every process runs the
same loop: process 0's device poll is the one that counts, baselines and try-runs count
the slowest process, process 0's decision is everyone's, and only process 0 calls
`on_event` and prints reports. A switch always goes through the checkpoint
(`distributed.can_place`).

The loop never waits on the device per step: `step` dispatches the compiled step and
returns the loss as a device array (fetch it when you need it); the trainer blocks once
every `timing_window` steps, which both fetches that window's losses into the records
and times the window (wall time / steps: honest, since the block drains the queue).
Periodic checkpoints are written in the background (`Checkpointer`); the trainer waits
for them only before a search (a switch restores from disk) and in `close()`.
History is bounded: the newest `history_limit` events and step records are kept, and
`totals` sums the whole run.

A run keeps every step it promises (DESIGN.md, "Never lose work"): `close()` (or the end
of ``with trainer:``, or the interpreter's exit when neither came) saves the last step
and waits for every write; SIGTERM / SIGINT save at the next step boundary, agreed
across processes, then raise `Interrupted`; a step whose loss or gradient norm is not
finite is found with its timing window's fetch (no extra sync) and handled by
`on_nonfinite`, and no non-finite state is ever saved, so every kept checkpoint is
finite; a failed background write is raised from the next `step`; one job at a time
writes a `checkpoint_dir` (`meshscale.store.run_lock`).

Never: change the live state during a search, touch devices the source did not grant,
or save a state holding nan or inf.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import os
import signal
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax

from meshscale.elastic import options
from meshscale.elastic import resources as resources_lib
from meshscale.elastic.interrupts import Interrupts
from meshscale.elastic.options import CheckpointPolicy, SwitchPolicy
from meshscale.elastic.steplog import StepLog, StepRecord
from meshscale.errors import (
    CheckpointWriteError,
    IncompatibleCheckpoint,
    InsufficientDevices,
    Interrupted,
    InvalidArgument,
    InvalidMeshShape,
    NonFiniteStep,
)
from meshscale.layout.mesh import MeshShape, device_ids
from meshscale.model.contract import Batch
from meshscale.planning import memory
from meshscale.planning.precompile import Precompiler, likely_next_counts, resolve_mode
from meshscale.planning.search import Baseline, Decision, search
from meshscale.planning.space import SearchSpace
from meshscale.planning.tryrun import LiveState
from meshscale.runtime import distributed
from meshscale.runtime.paths import run_path
from meshscale.store import writes
from meshscale.store.checkpoint import Checkpointer
from meshscale.store.run_lock import RunLock
from meshscale.training.compile_cache import enable_persistent_cache
from meshscale.training.timing import Timing
from meshscale.training.trainer import Trainer, TrainState

log = logging.getLogger(__name__)

Event = dict[str, Any]
_BASELINE_WINDOWS = 2  # clean timing windows a baseline from ordinary steps needs
_COUNTED = {"switch": "switches", "search": "searches", "checkpoint": "checkpoints"}


class ElasticTrainer:
    """Train a `Trainer` on whatever devices `resources` grants, on the best mesh.

    Every `Trainer` option (mixed precision, dropout keys, donation, state sharding,
    remat, constructors, the compile cache) is the trainer's own, so an elastic run
    trains exactly what the fixed-mesh `Trainer` would.

    Args:
      trainer: the model, optimizer, global batch and their options (`meshscale.Trainer`).
      checkpoint_dir: Orbax checkpoints (and, by default, JAX's compilation cache) go here;
        one job at a time writes it.
      resources: a `meshscale.elastic.resources` source, a device list or a count.
      space: the meshes a search may try (`SearchSpace`; ``p_min``, an int here, is the
        fewest pipeline stages the model fits in).
      timing: warm-up and timed steps of try-runs, the timing window (the loop blocks on
        the device once a window, fetching its losses), the baseline's span and how
        many events and step records are kept (`Timing`).
      switching: when to look for a better mesh and when to move (`SwitchPolicy`).
      checkpoints: what reaches disk and when; non-finite steps; signals
        (`CheckpointPolicy`).
      on_event: called with every event as it happens (the CLI prints them); on process 0
        only when the job has several processes.

    The keyword form of meshscale 0.1, ``ElasticTrainer(model, optimizer,
    global_batch=..., p_min=..., ...)``, still works for one release, with a
    `DeprecationWarning`.
    """

    def __init__(self, trainer: Trainer, *legacy_args, checkpoint_dir: str | os.PathLike,
                 resources: resources_lib.ResourceSource | Sequence[jax.Device] | int,
                 space: SearchSpace | None = None, timing: Timing | None = None,
                 switching: SwitchPolicy | None = None,
                 checkpoints: CheckpointPolicy | None = None,
                 on_event: Callable[[Event], None] | None = None, **legacy):
        if legacy_args or legacy or not isinstance(trainer, Trainer):
            self.__init__(**_from_old_form(trainer, legacy_args, legacy, checkpoint_dir,
                                           resources, on_event, space, timing, switching,
                                           checkpoints))
            return
        space, timing = space or SearchSpace(), timing or Timing()
        self.switching, self.checkpoints = switching or SwitchPolicy(), \
            checkpoints or CheckpointPolicy()
        skip = self.checkpoints.on_nonfinite == "skip_step"
        if trainer.skip_nonfinite != skip:
            raise InvalidArgument(
                "CheckpointPolicy(on_nonfinite='skip_step') and Trainer(skip_nonfinite=True) "
                "go together (the step skips on the device what the policy expects): set "
                f"both or neither (now on_nonfinite={self.checkpoints.on_nonfinite!r}, "
                f"skip_nonfinite={trainer.skip_nonfinite})")
        if not isinstance(space.p_min, int):
            raise InvalidArgument(f"ElasticTrainer needs an int p_min, got {space.p_min!r}: "
                                  "measure it once with meshscale search --p-min auto")
        if space.p_min > trainer.num_layers:
            raise InvalidArgument(
                f"p_min={space.p_min} is larger than the model's {trainer.num_layers} "
                "layers: a stage needs at least one layer, lower p_min")
        self.trainer, self.space, self.timing, self.p_min = trainer, space, timing, space.p_min
        self.checkpoint_dir = run_path(checkpoint_dir)  # local, or gs://... kept as given
        self.run_lock = RunLock(self.checkpoint_dir)
        self.run_lock.acquire()  # before anything opens the directory: one job at a time
        try:
            if self.checkpoints.persistent_cache:
                enable_persistent_cache(self.checkpoint_dir / "jax_cache")
            self.checkpointer = Checkpointer(self.checkpoint_dir / "state", self.trainer,
                                             max_to_keep=self.checkpoints.max_to_keep)
        except BaseException:
            self.run_lock.release()
            raise
        self.resources = (resources if isinstance(resources, resources_lib.ResourceSource)
                          else resources_lib.Static(resources))
        self.interrupts = Interrupts() if self.checkpoints.handle_signals else None
        self._state: TrainState | None = None  # the newest state: what close() saves
        self._nonfinite: int | None = None  # first non-finite step not yet acted on
        self._write_unchecked = False  # a write started, its outcome not yet agreed
        self._exit_key = writes.at_exit(self._close_at_exit)
        self.on_event = on_event
        self.shape: MeshShape | None = None
        self.devices: list[jax.Device] = []  # the current mesh's devices
        self._granted: list[jax.Device] = []  # what the source granted at the last poll
        self._history: collections.deque[Event] = collections.deque(
            maxlen=timing.history_limit)
        self.step_log = StepLog(global_batch=trainer.global_batch, timing_window=timing.window,
                                history_limit=timing.history_limit,
                                baseline_window=timing.baseline_steps)
        self.totals = self.step_log.totals
        self._step = 0  # the step counter on the host: reading state.step would sync
        self._stepped = False  # events before the first step carry no step number
        self._closed = False
        self._batch_sharding = None
        self._step_fn = None
        self._since_switch = 0
        self._last_switch_cost: float | None = None
        self.precompile_mode = resolve_mode(self.switching.precompile)
        self.precompiler = (None if self.precompile_mode == "off" else Precompiler(
            self.trainer, space=space, budget=self.switching.precompile_budget))
        self._planned: tuple | None = None

    # -- events -----------------------------------------------------------------------
    def _emit(self, kind: str, **data) -> Event:
        event = {"event": kind, "time": time.time(),
                 "step": self._step if self._stepped else None, **data}
        self._history.append(event)
        if kind in _COUNTED:
            setattr(self.totals, _COUNTED[kind], getattr(self.totals, _COUNTED[kind]) + 1)
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
            self._step = int(state.step)  # once, at start-up
            self._emit("resume", checkpoint_step=self._step, num_devices=len(devices))
        else:
            state = self.trainer.init_state(staging, devices)
            self._step = 0
            self._emit("start", num_devices=len(devices))
        self.shape, self.devices = staging, devices[: staging.num_devices]
        step = self._step if latest is not None else None
        state, decision = self._search(state, [example_batch], devices, baseline=None,
                                       current=None, step=step)
        best = decision.best
        if best is None:
            raise InsufficientDevices(f"no mesh could run on {len(devices)} devices: "
                                      f"{decision.reason}")
        state = self._switch(state, best.shape, devices, reason="start")
        self._state = state
        if self.interrupts is not None:
            self.interrupts.install()
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

    # -- the loop ---------------------------------------------------------------------
    def step(self, state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
        """One training step on the current mesh; every `check_every` steps, adapt.

        The state passed in is consumed (its buffers are donated to the step). Returns the
        new state and metrics: ``loss`` (a device scalar: reading it waits for this step,
        so read it only when needed), ``step`` and ``mesh`` (host values), and
        ``samples_per_second`` of the last closed timing window (nan before the first).
        """
        if self._step_fn is None or self._closed:
            raise RuntimeError("call ElasticTrainer.init(example_batch) before step()"
                               if not self._closed else "this ElasticTrainer is closed")
        self.trainer.check_batch(batch)
        self._raise_failed_write()
        if not self.step_log.open:
            self._open_window()
        placed = self.trainer.put_batch(batch, self.shape, self.devices,
                                        shardings=self._batch_sharding)
        state, metrics = self._step_fn(state, placed)
        self._step += 1
        self._stepped = True
        self._since_switch += 1
        self._state = state
        if self.step_log.add(self._step, metrics["loss"], metrics["grad_norm"]):
            self._found(self.step_log.end(self._quiet))
        if self.checkpoints.every and self._step % self.checkpoints.every == 0:
            self._save(state, reason="periodic")
        if self._nonfinite is not None:
            state = self._after_nonfinite(state)
        if self.interrupts is not None and \
                (number := self.interrupts.requested(self._step)) is not None:
            self._stop_on_signal(state, number)
        if self._step % self.switching.check_every == 0:
            state = self.check(state, batch)
        out = {"loss": metrics["loss"], "step": self._step, "mesh": str(self.shape),
               "samples_per_second": self.step_log.last_samples_per_second}
        return state, out

    # -- never lose work ----------------------------------------------------------------
    def _found(self, steps: list[int]) -> None:
        """Act on the non-finite steps a closed timing window found."""
        if not steps:
            return
        if self.checkpoints.on_nonfinite == "skip_step":
            log.warning("steps %s had a non-finite loss or gradient norm: their updates were "
                        "skipped", steps)
            self._emit("nonfinite", steps=steps, action="skipped")
        elif self._nonfinite is None:
            self._nonfinite = steps[0]

    def _after_nonfinite(self, state: TrainState) -> TrainState:
        """Stop, or rewind to the newest checkpoint (all kept ones are finite)."""
        bad, latest = self._nonfinite, self.checkpointer.latest_step()
        where = (f"the newest checkpoint, step {latest} in {self.checkpointer.directory}, "
                 "is finite" if latest is not None else "no checkpoint was saved")
        if self.checkpoints.on_nonfinite == "stop" or latest is None:
            self._state = None  # never saved, not even by close()
            self._emit("nonfinite", steps=[bad], action="stop")
            raise NonFiniteStep(
                f"step {bad} had a non-finite loss or gradient norm; {where}: lower the "
                "learning rate or check the data, or pass on_nonfinite='skip_step' or "
                "'rewind'", step=bad, checkpoint_step=latest)
        self._break_window()
        jax.tree.map(lambda x: x.delete(), state)  # garbage: make room for the restore
        state = self.checkpointer.restore(self.shape, devices=self.devices)
        fallback = self.checkpointer.last_fallback
        self._step = fallback.restored_step if fallback else latest
        self._nonfinite, self._state = None, state
        log.warning("step %d was not finite: rewound to checkpoint step %d", bad, self._step)
        self._emit("rewind", nonfinite_step=bad, checkpoint_step=self._step)
        return state

    def _stop_on_signal(self, state: TrainState, number: int) -> None:
        """Save this step, wait for it, and raise `Interrupted` (SIGTERM / SIGINT)."""
        name = signal.Signals(number).name
        self._save(state, reason=name)
        self.wait()
        if self._nonfinite is not None:
            self._after_nonfinite(state)  # stop raises; rewind restores the saved step
        saved = self.checkpointer.latest_step()
        message = (f"stopped by {name} after step {self._step}; step {saved} is saved in "
                   f"{self.checkpointer.directory}: run the same job again to resume (init "
                   f"restores step {saved})")
        print(f"meshscale: {message}", file=sys.stderr, flush=True)
        self._emit("interrupted", signal=name, checkpoint_step=saved)
        self.close()
        raise Interrupted(message, step=saved, signal_number=number,
                          directory=str(self.checkpointer.directory))

    def _raise_failed_write(self) -> None:
        """Raise `CheckpointWriteError` for a background write that failed (no wait).

        With several processes the writes end at different times, so the check is
        agreed (a collective) once a timing window, while a write is not yet checked."""
        if jax.process_count() == 1:
            problem = self.checkpointer.write_failure()
        elif self._write_unchecked and self._step % self.step_log.timing_window == 0:
            problem = distributed.failed_anywhere(self.checkpointer.write_failure())
            running = float(self.checkpointer.unchecked)  # this process's write still runs
            self._write_unchecked = bool(distributed.slowest(running))
        else:
            return
        if problem is not None:
            self._emit("checkpoint_failed", reason=problem)
            raise CheckpointWriteError(f"{problem}: fix the storage, then resume from the "
                                       "newest saved step")

    def _close_at_exit(self) -> None:
        """At interpreter exit without `close()`: finish (save the last step, wait for the
        writes); a step that cannot be saved is said in one line, never a traceback."""
        try:
            self.close()
        except Exception as e:
            print(f"meshscale: at exit: {e}", file=sys.stderr, flush=True)

    # -- timing windows and step records ---------------------------------------------
    def _open_window(self) -> None:
        """Start timing the next steps. The window counts for the baseline (is clean) only
        past the warm-up of a new mesh and with no checkpoint write beside it."""
        activity = self.precompiler.activity if self.precompiler else 0
        clean = self._since_switch >= self.timing.warmup and not self.checkpointer.saving
        self.step_log.begin(str(self.shape), self.shape.num_devices, clean=clean,
                            activity=activity)

    def _quiet(self, activity: int) -> bool:
        """Nothing ran beside a window: no background compile since `activity`, no
        checkpoint write."""
        return (self.precompiler is None or self.precompiler.quiet_since(activity)) \
            and not self.checkpointer.saving

    def _break_window(self) -> None:
        self._found(self.step_log.interrupt(self._quiet))

    @property
    def last_record(self) -> StepRecord | None:
        """The newest step record already fetched (no wait: the steps of the open timing
        window are not in it yet). For progress displays."""
        records = self.step_log.records
        return records[-1] if records else None

    @property
    def history(self) -> list[Event]:
        """The newest `history_limit` events, oldest first."""
        return list(self._history)

    @property
    def steps(self) -> list[StepRecord]:
        """The newest step records (waits for the steps still in flight)."""
        self._break_window()
        return list(self.step_log.records)

    def flush(self) -> None:
        """Wait for the steps in flight and record them (their losses fetched)."""
        self._break_window()

    def wait(self) -> None:
        """Wait for the steps in flight and for every checkpoint being written."""
        self.flush()
        self.checkpointer.wait()

    def close(self) -> None:
        """Finish: record the steps in flight, save the last step (unless it is on disk,
        not finite, or ``checkpoint_every=None``), wait for every write, stop the
        precompiler, release the run directory. Runs by itself at interpreter exit when
        not called (or use ``with trainer:``). A second call does nothing.

        Raises `CheckpointWriteError` when a write failed (the step is not on disk)."""
        if self._closed:
            return
        self._closed = True
        writes.cancel_at_exit(self._exit_key)
        try:
            self.flush()
            state = self._state
            if self.checkpoints.every is not None and self._stepped and state is not None \
                    and self._nonfinite is None and not state_deleted(state):
                self._save(state, reason="final")
            elif self._nonfinite is not None:
                log.warning("step %d was not finite: the last step is not saved",
                            self._nonfinite)
            self.checkpointer.close()  # waits; raises for a failed write
        finally:
            self._state = None
            if self.precompiler is not None:
                self.precompiler.close()
            if self.interrupts is not None:
                self.interrupts.uninstall()
            self.run_lock.release()

    def __enter__(self) -> ElasticTrainer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def check(self, state: TrainState, batch: Batch) -> TrainState:
        """Poll the resource source now; on a change, save, search and maybe switch."""
        devices = self._poll()
        if device_ids(devices) == device_ids(self._granted):
            self._plan_precompile()
            return state
        self._break_window()
        if self._nonfinite is not None:  # handled first (step); the change is seen again
            return state
        self._emit("devices_changed", before=len(self._granted), after=len(devices),
                   device_ids=list(device_ids(devices)))
        self._save(state, reason="before search")
        self.checkpointer.wait()  # on disk before anything is tried: a switch restores it
        try:
            self._require(devices)
        finally:
            self._granted = list(devices)
        current_ok = set(device_ids(self.devices)) <= set(device_ids(devices))
        baseline = self.baseline() if current_ok else None
        total = self.switching.total_steps
        remaining = (total - self._step) if total else None
        state, decision = self._search(state, [batch], devices, baseline=baseline,
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

    # -- pieces -----------------------------------------------------------------------
    def _save(self, state: TrainState, *, reason: str) -> None:
        """Start writing `state` (in the background: training goes on while it is written;
        `seconds` is the blocking part, copying the state off the devices)."""
        step = self._step
        self.step_log.spoil()  # the save's blocking part is in this window
        self._found(self.step_log.nonfinite())  # a non-finite step is never saved
        if self._nonfinite is not None:
            return
        start = time.perf_counter()
        try:
            if not self.checkpointer.save(state, shape=self.shape, step=step):
                return  # this step is on disk already (a damaged copy is replaced)
        except NonFiniteStep:  # finite loss and gradients, yet nan/inf in the state
            self._nonfinite = step
            return
        self._write_unchecked = True
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
        quiet = self.precompiler.paused() if self.precompiler else contextlib.nullcontext()
        with quiet:  # try-runs are timed on cores the compiler does not share
            decision = search(self.trainer, live, batches, devices, space=self.space,
                              timing=self.timing, baseline=baseline,
                              threshold=self.switching.threshold, eps=self.switching.eps,
                              measure=self.switching.measure, current=current,
                              remaining_steps=remaining_steps,
                              switch_cost=self._last_switch_cost)
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
        self.shape, self.devices = shape, list(devices[: shape.num_devices])
        self._granted = list(devices)
        self.step_log.recent.clear()
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
            self._emit("precompile", counts=list(counts), queued=queued)


def state_deleted(state: TrainState) -> bool:
    return any(x.is_deleted() for x in jax.tree.leaves(state))


def _from_old_form(model, args, kwargs, checkpoint_dir, resources, on_event, *new) -> dict:
    """The deprecated keyword form's arguments, as the new constructor takes them."""
    if isinstance(model, Trainer):
        raise TypeError(f"ElasticTrainer(trainer, ...) takes the option objects, not "
                        f"{sorted(kwargs) or 'positional arguments'}: see its docstring")
    if any(x is not None for x in new):
        raise InvalidArgument("ElasticTrainer: pass a Trainer with the option objects, or the "
                              "old keyword form, not both")
    optimizer = args[0] if args else kwargs.pop("optimizer", None)
    if optimizer is None or len(args) > 1:
        raise TypeError("ElasticTrainer(model, optimizer, ...): pass a Trainer instead")
    return options.from_keywords(model, optimizer, {
        **kwargs, "checkpoint_dir": checkpoint_dir, "resources": resources,
        "on_event": on_event})
