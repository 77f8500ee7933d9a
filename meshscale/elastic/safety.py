"""The part of `ElasticTrainer` that keeps every step it promises (DESIGN.md, "Never lose
work"): saves that never hold nan or inf, non-finite steps stopped, skipped or rewound,
SIGTERM / SIGINT saved at a step boundary, failed background writes raised, the exit
hook. A mixin: it reads and sets the loop's state and is never used alone.
"""

from __future__ import annotations

import logging
import signal
import sys
import time

import jax

from meshscale.elastic import events
from meshscale.errors import CheckpointWriteError, Interrupted, NonFiniteStep
from meshscale.runtime import distributed
from meshscale.training.trainer import TrainState

log = logging.getLogger("meshscale.elastic.trainer")


class NeverLoseWork:
    """Saves, non-finite steps, signals and failed writes: mixed into `ElasticTrainer`."""

    def _found(self, steps: list[int]) -> None:
        """Act on the non-finite steps a closed timing window found."""
        if not steps:
            return
        if self.checkpoints.on_nonfinite == "skip_step":
            log.warning("steps %s had a non-finite loss or gradient norm: their updates were "
                        "skipped", steps)
            self._emit(events.NonFinite, steps=steps, action="skipped")
        elif self._nonfinite is None:
            self._nonfinite = steps[0]

    def _after_nonfinite(self, state: TrainState) -> TrainState:
        """Stop, or rewind to the newest checkpoint (all kept ones are finite)."""
        bad, latest = self._nonfinite, self.checkpointer.latest_step()
        where = (f"the newest checkpoint, step {latest} in {self.checkpointer.directory}, "
                 "is finite" if latest is not None else "no checkpoint was saved")
        if self.checkpoints.on_nonfinite == "stop" or latest is None:
            self._state = None  # never saved, not even by close()
            self._emit(events.NonFinite, steps=[bad], action="stop")
            raise NonFiniteStep(
                f"step {bad} had a non-finite loss or gradient norm; {where}: lower the "
                "learning rate or check the data, or pass on_nonfinite='skip_step' or "
                "'rewind'", step=bad, checkpoint_step=latest)
        self._break_window()
        jax.tree.map(lambda x: x.delete(), state)  # garbage: make room for the restore
        with self.ledger.spend("restore"):
            state = self.checkpointer.restore(self.shape, devices=self.devices)
        fallback = self.checkpointer.last_fallback
        self._step = fallback.restored_step if fallback else latest
        self._nonfinite, self._state = None, state
        log.warning("step %d was not finite: rewound to checkpoint step %d", bad, self._step)
        self._emit(events.Rewind, nonfinite_step=bad, checkpoint_step=self._step)
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
        self._emit(events.Interruption, signal=name, checkpoint_step=saved)
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
            self._emit(events.CheckpointFailed, reason=problem)
            raise CheckpointWriteError(f"{problem}: fix the storage, then resume from the "
                                       "newest saved step")

    def _close_at_exit(self) -> None:
        """At interpreter exit without `close()`: finish (save the last step, wait for the
        writes); a step that cannot be saved is said in one line, never a traceback."""
        try:
            self.close()
        except Exception as e:
            print(f"meshscale: at exit: {e}", file=sys.stderr, flush=True)

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
            with self.ledger.spend("checkpoint"):
                if not self.checkpointer.save(state, shape=self.shape, step=step):
                    return  # this step is on disk already (a damaged copy is replaced)
        except NonFiniteStep:  # finite loss and gradients, yet nan/inf in the state
            self._nonfinite = step
            return
        self._write_unchecked = True
        self._emit(events.Checkpoint, checkpoint_step=step, reason=reason,
                   seconds=time.perf_counter() - start)


def state_deleted(state: TrainState) -> bool:
    return any(x.is_deleted() for x in jax.tree.leaves(state))
