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
import logging
import os
import time
from collections.abc import Callable, Sequence

import jax

from meshscale.data.source import BatchSource
from meshscale.elastic import events, options
from meshscale.elastic import resources as resources_lib
from meshscale.elastic.adapting import Adapting
from meshscale.elastic.events import Event
from meshscale.elastic.interrupts import Interrupts
from meshscale.elastic.options import CheckpointPolicy, MetricsPolicy, SwitchPolicy
from meshscale.elastic.run_metrics import RunMetrics
from meshscale.elastic.safety import NeverLoseWork, state_deleted
from meshscale.elastic.steplog import StepLog, StepRecord
from meshscale.errors import (
    InsufficientDevices,
    InvalidArgument,
)
from meshscale.layout.mesh import MeshShape
from meshscale.model.contract import Batch
from meshscale.observe.goodput import PRODUCTIVE, Ledger
from meshscale.planning.precompile import Precompiler, resolve_mode
from meshscale.planning.space import SearchSpace
from meshscale.runtime import distributed
from meshscale.runtime.paths import run_path
from meshscale.store import writes
from meshscale.store.checkpoint import Checkpointer
from meshscale.store.run_lock import RunLock
from meshscale.training.compile_cache import enable_persistent_cache
from meshscale.training.timing import Timing
from meshscale.training.trainer import Trainer, TrainState

log = logging.getLogger(__name__)

_COUNTED = {events.Switch: "switches", events.Search: "searches",
            events.Checkpoint: "checkpoints"}


class ElasticTrainer(NeverLoseWork, Adapting):
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
      metrics: where per-window metrics and events are written (`MetricsPolicy`; by
        default ``metrics.jsonl`` and TensorBoard files in `checkpoint_dir`).
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
                 metrics: MetricsPolicy | None = None,
                 on_event: Callable[[Event], None] | None = None, **legacy):
        if legacy_args or legacy or not isinstance(trainer, Trainer):
            self.__init__(**_from_old_form(trainer, legacy_args, legacy, checkpoint_dir,
                                           resources, on_event, space, timing, switching,
                                           checkpoints, metrics))
            return
        # Where every second goes (goodput), from the process start on: built first.
        self.ledger = Ledger()
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
            self.run_metrics = RunMetrics(metrics or MetricsPolicy(), self.checkpoint_dir,
                                          self.ledger)
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
                                baseline_window=timing.baseline_steps,
                                on_window=self.run_metrics.window)
        self._step = 0  # the step counter on the host: reading state.step would sync
        self._stepped = False  # events before the first step carry no step number
        self._closed = False
        self._batch_sharding = None
        self._rows = slice(0, trainer.global_batch)  # this process's rows on the mesh
        self._step_fn = None
        self._since_switch = 0
        self._last_switch_cost: float | None = None
        self.precompile_mode = resolve_mode(self.switching.precompile)
        self.precompiler = (None if self.precompile_mode == "off" else Precompiler(
            self.trainer, space=space, budget=self.switching.precompile_budget))
        self._planned: tuple | None = None

    # -- events -----------------------------------------------------------------------
    def _emit(self, kind: type[Event], **data) -> Event:
        event = kind(time=time.time(), step=self._step if self._stepped else None, **data)
        self._history.append(event)
        if kind in _COUNTED:
            counts = self.step_log.totals  # not `totals`: that also takes a goodput snapshot
            setattr(counts, _COUNTED[kind], getattr(counts, _COUNTED[kind]) + 1)
        log.info("%s %s", kind.kind, {k: v for k, v in data.items() if k != "decision"})
        self.run_metrics.event(event, self._step)
        if self.on_event is not None and distributed.is_main():
            self.on_event(event)
        return event

    @property
    def totals(self):
        """Whole-run counters and goodput (`meshscale.elastic.steplog.Totals`)."""
        self.step_log.totals.goodput = self.ledger.snapshot()
        return self.step_log.totals

    # -- start-up ---------------------------------------------------------------------
    def init(self, example_batch: Batch | BatchSource) -> TrainState:
        """The state to train from: the latest checkpoint if any, else fresh; on the best mesh.

        `example_batch`: one global batch, or the data source the loop will step with
        (`meshscale.data.Batches`: its examples are checked against the model's batch).
        Refuses to start (`InsufficientDevices`) with fewer devices than `p_min`.
        """
        source = example_batch if isinstance(example_batch, BatchSource) else None
        if not self.trainer.knows_batch:
            self.trainer.set_example_batch(source.spec() if source else example_batch)
        if source is not None:
            source.check(self.trainer.batch_spec)
        devices = self._poll()
        self._require(devices)
        staging = self._staging_shape(devices)
        latest = self.checkpointer.latest_step()
        if latest is not None:
            with self.ledger.spend("restore"):
                state = self.checkpointer.restore(staging, devices=devices)
            self._step = int(state.step)  # once, at start-up
            self._emit(events.Resume, checkpoint_step=self._step, num_devices=len(devices))
        else:
            state = self.trainer.init_state(staging, devices)
            self._step = 0
            self._emit(events.Start, num_devices=len(devices))
        self.shape, self.devices = staging, devices[: staging.num_devices]
        step = self._step if latest is not None else None
        state, decision = self._search(state, self._tryrun_batches(example_batch), devices,
                                       baseline=None, current=None, step=step)
        best = decision.best
        if best is None:
            raise InsufficientDevices(f"no mesh could run on {len(devices)} devices: "
                                      f"{decision.reason}")
        state = self._switch(state, best.shape, devices, reason="start")
        self._state = state
        if self.interrupts is not None:
            self.interrupts.install()
        self.ledger.set_base(PRODUCTIVE)  # from here on the loop trains
        return state

    # -- the loop ---------------------------------------------------------------------
    def step(self, state: TrainState, batch: Batch | BatchSource) -> tuple[TrainState, dict]:
        """One training step on the current mesh; every `check_every` steps, adapt.

        `batch`: the global batch (with several processes, or just this process's rows),
        or a data source (`meshscale.data.Batches`): the trainer then reads batch `step`
        (its own step counter, restored with the checkpoint: the data position), only the
        rows this process's devices hold on the current mesh, while the source prefetches
        the next steps' rows. The state passed in is consumed (its buffers are donated
        to the step). Returns the
        new state and metrics: ``loss`` (a device scalar: reading it waits for this step,
        so read it only when needed), ``step`` and ``mesh`` (host values), and
        ``samples_per_second`` of the last closed timing window (nan before the first).
        """
        if self._step_fn is None or self._closed:
            raise RuntimeError("call ElasticTrainer.init(example_batch) before step()"
                               if not self._closed else "this ElasticTrainer is closed")
        source = batch if isinstance(batch, BatchSource) else None
        if source is not None:
            batch = source.rows(self._step, self._rows)
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
            state = self.check(state, source or batch)
        out = {"loss": metrics["loss"], "step": self._step, "mesh": str(self.shape),
               "samples_per_second": self.step_log.last_samples_per_second}
        return state, out

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
        with self.ledger.spend("checkpoint"):
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
            with self.ledger.spend("checkpoint"):
                self.checkpointer.close()  # waits; raises for a failed write
        finally:
            self._state = None
            self.step_log.totals.goodput = self.run_metrics.close(self._step)
            if self.precompiler is not None:
                self.precompiler.close()
            if self.interrupts is not None:
                self.interrupts.uninstall()
            self.run_lock.release()

    def __enter__(self) -> ElasticTrainer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


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
