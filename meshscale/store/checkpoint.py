"""Checkpoints of the train state on Orbax, restored straight onto any mesh.

A switch of mesh, a restart with another device count and a resume after a crash all go
through here: `Checkpointer.save` writes the state as a plain Orbax tree plus a JSON
metadata item; `Checkpointer.restore` reads it into the `NamedSharding`s of the target
mesh (each device reads only its shards; nothing is first gathered on one host).

What this module must never do: load a checkpoint of another model, optimizer or global
batch (that raises `IncompatibleCheckpoint`), or change the checkpoint directory when a
restore fails. A damaged newest step (missing or truncated files, no commit marker) is
skipped for the previous good one, with a warning and a record in `last_fallback`; it is
kept for inspection until training saves that step number again, which first moves it
aside to ``DIR/<step>.damaged`` (Orbax lists only integer-named steps).

Saves are asynchronous: `save` returns once the state is copied off the devices and
Orbax writes it in the background, so periodic checkpoints overlap training. What must
be on disk is waited for where it is read: every restore and metadata read, `wait()`,
`close()`, and the next save (Orbax finishes one save before it starts another).
A write that fails in the background is never silent: `write_failure()` says which step
is missing and why (without waiting), and `wait()` raises `CheckpointWriteError` (Orbax
itself only logs it, `meshscale.store.writes`).

Contents are verified: `save` records a 64-bit checksum of every leaf (computed on the
devices, `meshscale.store.integrity`) and refuses a state holding nan or inf
(`NonFiniteStep`), so a kept checkpoint is always finite; `restore` checks the sums of
what it read, and a mismatch (flipped bytes) is a damaged step like a missing file.

With several processes, every local view of the directory that decides what the
processes do next is agreed (`meshscale.runtime.distributed`): the step list is process 0's, a
step is readable only if it is readable on every process (commit marker, metadata,
arrays), so a step damaged for one process only (an NFS cache, say) is skipped by all
and every process restores the same step, never a split job or a hang.

What a step is on disk (item names, metadata, compatibility checks, restore targets):
`meshscale.store.format`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time

import jax
import orbax.checkpoint as ocp

from meshscale.errors import CheckpointWriteError, IncompatibleCheckpoint, NonFiniteStep
from meshscale.layout import stacking
from meshscale.layout.mesh import MeshShape
from meshscale.runtime import distributed
from meshscale.runtime.paths import run_path
from meshscale.store import integrity, writes
from meshscale.store.format import (
    COMMIT_MARKER,
    FORMAT,
    META_FILE,
    META_ITEM,
    STATE_ITEM,
    Devices,
    check_compatible,
    committed,
    read_metadata,
    readable_metadata,
    restore_args,
    restore_targets,
    saved_shape,
    state_handler,
    step_metadata,
    target_shardings,
)
from meshscale.store.state_tree import state_to_tree, tree_fingerprint, tree_to_state
from meshscale.training.trainer import Trainer, TrainState

log = logging.getLogger(__name__)

# Moved to `meshscale.store.format`; still importable from here.
__all__ = ["COMMIT_MARKER", "FORMAT", "META_FILE", "META_ITEM", "STATE_ITEM", "Checkpointer",
           "Fallback"]


@dataclasses.dataclass(frozen=True)
class Fallback:
    """A restore that skipped damaged newer steps: which one it used and why."""

    restored_step: int
    skipped: tuple[tuple[int, str], ...]  # (step, reason), newest first


class Checkpointer:
    """Save and restore one `Trainer`'s state in `directory`, onto any mesh.

    Args:
      directory: where the steps live (created if missing); a local path or a URL such
        as ``gs://bucket/run/state`` (kept as given, `meshscale.runtime.paths.run_path`).
      trainer: fixes the model, optimizer and global batch a checkpoint must match.
      max_to_keep: keep the newest K steps; older ones are deleted after each save.
      async_save: write in the background (`save` returns once the state is copied off
        the devices); `wait()`, the next save, and every read block until the write is
        done.
      checksums: record each leaf's checksum at save and verify it on restore (steps
        saved without them restore unverified), in the same pass as the check that the
        state is finite. Off only to measure what that pass costs: then neither is done.
    """

    def __init__(self, directory: str | os.PathLike, trainer: Trainer, *,
                 max_to_keep: int = 3, async_save: bool = True, checksums: bool = True):
        self.directory = run_path(directory)
        self.trainer = trainer
        self.last_fallback: Fallback | None = None
        self._damaged: set[int] = set()  # steps a restore found unreadable
        self._opt_fingerprint = tree_fingerprint(trainer.abstract_state().opt_state)
        self._directory_checked = False
        self.checksums = checksums
        self._pending: list[tuple[int, float]] = []  # (step, start) of writes not yet checked
        writes.quiet_orbax()
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, enable_async_checkpointing=async_save),
            handler_registry=ocp.handlers.create_default_handler_registry(**{
                STATE_ITEM: state_handler(), META_ITEM: ocp.JsonCheckpointHandler()}))

    # -- writing ------------------------------------------------------------------------
    def save(self, state: TrainState, *, shape: MeshShape | None = None,
             step: int | None = None, force: bool = True) -> bool:
        """Start writing `state` as step `step` (default ``int(state.step)``).

        Returns False, writing nothing, when that step is already saved (the state at a
        step is what training made of it; rewriting it would only cost time).
        Raises `IncompatibleCheckpoint` if the directory holds another model's steps,
        `NonFiniteStep` (writing nothing) if the state holds nan or inf, and
        `CheckpointWriteError` if an earlier write of this process failed.
        """
        step = int(state.step) if step is None else int(step)
        if not self._directory_checked:
            self._check_directory()
            self._directory_checked = True
        if step in self.all_steps():
            if step not in self._damaged:
                log.info("step %d already saved in %s; not saving it again", step,
                         self.directory)
                return False
            self._set_aside(step)
        # Circular stacks as one layer axis (a copy of them until Orbax has them on the
        # host): every step on disk is layer-major, whatever mesh wrote it.
        state = stacking.layer_major(state, self.trainer.num_layers)
        # One pass on the devices (it waits for the step that made `state`).
        digests, finite = integrity.check(state) if self.checksums else (None, True)
        if not finite:
            raise NonFiniteStep(
                f"the state at step {step} holds nan or inf: not saved to {self.directory}",
                step=step, checkpoint_step=self.latest_step(committed=False))
        meta = step_metadata(self.trainer, state, shape=shape, step=step,
                             opt_fingerprint=self._opt_fingerprint, digests=digests)
        # The previous write first: Orbax would wait for it here anyway, and it is checked
        # before this save can rotate it out (max_to_keep).
        self._raise_failed_write(block=True)
        begun = time.monotonic()  # Orbax's errors about this write come after this
        try:
            started = self._manager.save(step, force=force, args=ocp.args.Composite(**{
                STATE_ITEM: ocp.args.PyTreeSave(state_to_tree(state)),
                META_ITEM: ocp.args.JsonSave(meta)}))
        except OSError as e:  # the directory refused at once (read-only, full, removed)
            writes.release_stuck_threads()
            raise CheckpointWriteError(f"checkpoint step {step} was not written to "
                                       f"{self.directory}: {_reason(e)}") from e
        self._pending.append((step, begun))
        return started

    def wait(self) -> None:
        """Block until every started save is on disk; raise `CheckpointWriteError` (one
        line: the step, the directory, the cause) if one of them failed."""
        self._raise_failed_write(block=True)

    def write_failure(self, *, block: bool = False) -> str | None:
        """Why a write this process started is not on disk, or None (also while writes
        are still running, unless `block`). Each failure is reported once. After one, the
        Orbax threads that would wait for it are released (the process can exit)."""
        if not self._pending:
            return None
        if block:
            try:
                self._manager.wait_until_finished()
            except Exception as e:  # Orbax re-raises some failures here; read them below
                log.debug("orbax wait: %s", e)
        elif self.saving:
            return None
        pending, self._pending = self._pending, []
        for step, start in pending:
            if not committed(self.directory, step):
                writes.release_stuck_threads()
                self._manager.reload()
                cause = writes.OrbaxErrors.since(start) or "no commit marker after the write"
                return f"checkpoint step {step} was not written to {self.directory}: {cause}"
        return None

    @property
    def unchecked(self) -> bool:
        """Whether a write this process started is not yet checked (`write_failure`)."""
        return bool(self._pending)

    def _raise_failed_write(self, *, block: bool = False) -> None:
        if (problem := self.write_failure(block=block)) is not None:
            raise CheckpointWriteError(problem)

    @property
    def saving(self) -> bool:
        """Whether a save started by this process may still be writing."""
        return self._manager.is_saving_in_progress()

    def close(self) -> None:
        """Wait for the writes (raising `CheckpointWriteError` if one failed), then
        release Orbax's threads. Always closes, even when a write failed."""
        try:
            self.wait()
        finally:
            try:
                self._manager.close()
            except Exception as e:  # already reported by wait()
                log.debug("orbax close: %s", e)

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- reading ------------------------------------------------------------------------
    def all_steps(self, *, committed: bool = False) -> list[int]:
        """The saved steps, process 0's list on every process.

        By default without waiting: the steps on disk when last read plus those this
        process has started saving since (some may still be writing). With
        ``committed=True``, first waits for the writes in flight and re-reads the
        directory: only steps whose writes have ended (a damaged one still counts, and
        `restore` skips it).
        """
        if committed:
            self.wait()
            self._manager.reload()
        return distributed.broadcast(sorted(self._manager.all_steps()))

    def latest_step(self, *, committed: bool = True) -> int | None:
        """The newest step on disk (waiting for writes in flight, see `all_steps`)."""
        steps = self.all_steps(committed=committed)
        return steps[-1] if steps else None

    def metadata(self, step: int | None = None) -> dict:
        """The JSON metadata of `step` (default: the latest)."""
        return read_metadata(self.directory, self._existing_step(step))

    def restore(self, target: MeshShape | TrainState, *, step: int | None = None,
                devices: Devices = None) -> TrainState:
        """The saved state, read directly into the shardings of `target`.

        Args:
          target: a `MeshShape` (shardings from `trainer.shardings(target, devices)`) or a
            `TrainState` whose leaves are `NamedSharding`s (onto the mesh the step was
            saved from, the stack keeps its stored padding; onto another, it is padded
            for a GPipe mesh of their ``pipe`` size: pass a `MeshShape` for a circular
            one; `meshscale.store.format.restore_targets`).
          step: the step to read; None reads the newest readable one, skipping damaged
            newer steps (recorded in `last_fallback`, with a warning).
          devices: the devices of a `MeshShape` target's mesh.
        """
        if not isinstance(target, MeshShape):
            target_shardings(target)  # a wrong target is refused before any read
        if step is not None:
            step = self._existing_step(step)
            state, problem = self._restore_step(step, target, devices)
            if problem is not None:
                self._damaged.add(step)
                raise IncompatibleCheckpoint(
                    f"step {step} in {self.directory} is unreadable ({problem}): restore "
                    f"another step (available: {self.all_steps()})")
            return state
        steps = self.all_steps(committed=True)
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {self.directory}: save one first")
        skipped: list[tuple[int, str]] = []
        for candidate in reversed(steps):
            state, problem = self._restore_step(candidate, target, devices)
            if problem is not None:  # damaged step (for some process): the previous one
                skipped.append((candidate, problem))
                self._damaged.add(candidate)
                log.warning("checkpoint step %d in %s is unreadable (%s); trying the "
                            "previous step", candidate, self.directory, problem)
                continue
            self.last_fallback = Fallback(candidate, tuple(skipped)) if skipped else None
            if skipped:
                log.warning("restored step %d from %s instead of damaged step(s) %s",
                            candidate, self.directory, [s for s, _ in skipped])
            return state
        reasons = "; ".join(f"{s}: {r}" for s, r in skipped)
        raise IncompatibleCheckpoint(
            f"no step in {self.directory} is readable ({reasons}): delete the damaged step "
            "directories or point checkpoint_dir elsewhere")

    # -- internals ----------------------------------------------------------------------
    def _set_aside(self, step: int) -> None:
        """Rename damaged step `step` to ``<step>.damaged[.N]`` so the step can be saved
        again (process 0 renames; every process waits for it)."""
        if jax.process_index() == 0:
            target = self.directory / f"{step}.damaged"
            n = 1
            while target.exists():
                target, n = self.directory / f"{step}.damaged.{n}", n + 1
            (self.directory / str(step)).rename(target)
            log.warning("moved damaged checkpoint step %d aside to %s", step, target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"meshscale set aside step {step}")
        self._damaged.discard(step)
        self._manager.reload()

    def _existing_step(self, step: int | None) -> int:
        steps = self.all_steps(committed=True)
        if step is None:
            if not steps:
                raise FileNotFoundError(f"no checkpoint in {self.directory}: save one first")
            return steps[-1]
        if int(step) not in steps:
            raise FileNotFoundError(
                f"no step {step} in {self.directory}: choose one of {steps}")
        return int(step)

    def _restore_step(self, step: int, target: MeshShape | TrainState,
                      devices: Devices) -> tuple[TrainState | None, str | None]:
        """(state, None), or (None, why step `step` is unreadable on some process).

        Every check is agreed before the next collective read: the commit marker and the
        metadata first, then the arrays. `IncompatibleCheckpoint` (another model's step)
        is raised on every process alike.
        """
        problem = None
        try:
            meta = readable_metadata(self.directory, step, self.trainer,
                                     self._opt_fingerprint)
        except IncompatibleCheckpoint as e:
            problem = f"{_INCOMPATIBLE}{e}"
        except Exception as e:
            problem = _reason(e)
        if (problem := distributed.failed_anywhere(problem)) is not None:
            if problem.startswith(_INCOMPATIBLE):
                raise IncompatibleCheckpoint(problem[len(_INCOMPATIBLE):])
            return None, problem
        # Where the stored padding matters, the step's own record of its mesh says it.
        abstract = restore_targets(self.trainer, target, devices,
                                   saved_shape(meta, self.trainer))
        read = stacking.layer_major_targets(abstract, self.trainer.num_layers)
        tree = state_to_tree(read)
        state = None
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**{
                STATE_ITEM: ocp.args.PyTreeRestore(tree, restore_args=restore_args(tree))}))
            state = tree_to_state(restored[STATE_ITEM], read)
        except Exception as e:
            problem = _reason(e)
        if (problem := distributed.failed_anywhere(problem)) is not None:
            return None, problem
        stored = meta.get("digests") if self.checksums else None  # older steps: none
        if stored is not None:  # every process alike: the sums are one collective
            problem = integrity.compare(stored, integrity.check(state)[0])
        if (problem := distributed.failed_anywhere(problem)) is not None:
            return None, problem
        return stacking.restacked(state, abstract), None  # circular stacks: stored form

    def _check_directory(self) -> None:
        """Before the first save: refuse (on every process alike) a directory whose newest
        readable metadata belongs to another model, optimizer or batch."""
        problem = None
        latest = self.latest_step(committed=False)  # as listed when the manager started
        if latest is not None:
            try:
                check_compatible(read_metadata(self.directory, latest), self.trainer,
                                 self._opt_fingerprint, self.directory)
            except IncompatibleCheckpoint as e:
                problem = str(e)
            except Exception:  # a damaged step says nothing about the model
                pass
        if (problem := distributed.failed_anywhere(problem)) is not None:
            raise IncompatibleCheckpoint(problem)

_INCOMPATIBLE = "incompatible: "


def _reason(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:200] if lines else ''}"
