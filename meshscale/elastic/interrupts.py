"""SIGTERM and SIGINT become "save at the next step boundary, then stop", on every process.

Spot VMs, Kubernetes and SLURM send SIGTERM some seconds before the kill; Ctrl-C sends
SIGINT. Neither may interrupt a step or a checkpoint write half-way, so a handler only
records the signal, and the training loop asks `Interrupts.requested(step)` after each
step. With several processes the stop must happen at the same step everywhere: JAX's
preemption service (`multihost_utils.reached_preemption_sync_point`, what Orbax's
`CheckpointManager` uses) catches SIGTERM itself in every process started by
`jax.distributed.initialize` and agrees on the step, so there SIGTERM is left to it and a
SIGINT is turned into a SIGTERM to this process. A second Ctrl-C stops at once (the
previous handler is back after the first).

Never: act inside the handler beyond recording the signal, or install handlers from a
thread other than the main one (Python allows only that; then nothing is installed).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading

import jax

log = logging.getLogger(__name__)


def _jax_preemption_service() -> bool:
    """Whether this process is in a `jax.distributed` job whose preemption service runs."""
    if not jax.distributed.is_initialized():
        return False
    from jax._src import distributed as jax_distributed

    return getattr(jax_distributed.global_state, "preemption_sync_manager", None) is not None


class Interrupts:
    """Records SIGTERM / SIGINT while installed; `requested` says when to stop."""

    def __init__(self) -> None:
        self.signal_number: int | None = None
        self._previous: dict[int, object] = {}
        self._agreed = False  # the job's processes agree through JAX's preemption service

    def install(self) -> None:
        if self._previous or threading.current_thread() is not threading.main_thread():
            return
        self._agreed = _jax_preemption_service()
        if jax.process_count() > 1 and not self._agreed:
            log.warning("JAX's preemption service is off (jax_enable_preemption_service): "
                        "SIGTERM and SIGINT stop this job without saving")
            return
        wanted = (signal.SIGINT,) if self._agreed else (signal.SIGINT, signal.SIGTERM)
        for number in wanted:
            if signal.getsignal(number) == signal.SIG_IGN:
                continue  # ignored by whoever started us (`cmd &` ignores SIGINT): kept so
            self._previous[number] = signal.signal(number, self._handle)

    def uninstall(self) -> None:
        for number, previous in self._previous.items():
            if signal.getsignal(number) == self._handle:
                signal.signal(number, previous)
        self._previous.clear()

    def _handle(self, number: int, frame) -> None:
        self.signal_number = self.signal_number or number
        signal.signal(number, self._previous.get(number, signal.SIG_DFL))  # 2nd: at once
        name = signal.Signals(number).name
        print(f"meshscale: {name} received: saving at the next step boundary"
              + (" (Ctrl-C again stops at once)" if number == signal.SIGINT else ""),
              file=sys.stderr, flush=True)
        if self._agreed and number != signal.SIGTERM:
            os.kill(os.getpid(), signal.SIGTERM)  # JAX's preemption notifier takes it

    def requested(self, step: int) -> int | None:
        """The signal to stop for after `step`, the same on every process, or None.

        With JAX's preemption service this must be called after every step, on every
        process, with the same step numbers (a cheap local check until a notice came).
        """
        if self._agreed:
            from jax.experimental import multihost_utils

            if multihost_utils.reached_preemption_sync_point(step):
                return self.signal_number or signal.SIGTERM
            return None
        return self.signal_number
