"""Background checkpoint writes: their failures, Orbax's noise about them, and the exit.

Orbax writes a checkpoint in background threads. Three things about those threads are
not what a training job needs, and this module mends each:

- A failed write is only *logged* (Orbax's save-finalize thread clears the error), so
  the caller never hears of it. `OrbaxErrors` keeps the first line of every error Orbax
  logs about a write, so meshscale can raise it from the next step (`Checkpointer`
  checks each step it started for its commit marker).
- After a failure, Orbax's signalling threads wait up to 20 minutes for predecessors that
  will never finish; they are not daemons, so the interpreter cannot exit.
  `release_stuck_threads` cancels them and sets the signals they wait for.
- At interpreter exit, `concurrent.futures` refuses new work before `atexit` handlers
  run, so a write still in flight when a script returns fails ("cannot schedule new
  futures after interpreter shutdown"). `at_exit` runs a callback before that (Python's
  threading shutdown hooks), so a trainer can finish its writes.

Global effects, said loudly: `quiet_orbax()` (called once by the first `Checkpointer`)
adds a filter to the ``absl`` logger that turns Orbax's ERROR records about writes into
one DEBUG record on ``meshscale.store.writes`` (the text is kept in `OrbaxErrors`), and chains
a `sys.unraisablehook` that moves tensorstore's "Exception ignored in coroutine" reports
after a failed read to DEBUG. Everything else passes through unchanged.

Never: swallow an error without recording it, or keep a process from exiting.
"""

from __future__ import annotations

import collections
import itertools
import logging
import sys
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


class OrbaxErrors:
    """The newest errors Orbax logged about background writes: (time, "Type: first line")."""

    recent: collections.deque[tuple[float, str]] = collections.deque(maxlen=16)

    @classmethod
    def since(cls, start: float) -> str | None:
        """The first error logged at or after `start` (``time.monotonic()``), or None."""
        return next((text for t, text in cls.recent if t >= start), None)


class _OrbaxFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR or "orbax" not in record.pathname:
            return True
        exc = record.exc_info[1] if record.exc_info else None
        text = (f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}"
                if exc is not None and str(exc).strip() else record.getMessage()[:300])
        OrbaxErrors.recent.append((time.monotonic(), text))
        log.debug("orbax: %s", record.getMessage(), exc_info=record.exc_info)
        return False


_installed = False


def quiet_orbax() -> None:
    """Install the ``absl`` log filter and the unraisable-exception hook (once)."""
    global _installed
    if _installed:
        return
    _installed = True
    logging.getLogger("absl").addFilter(_OrbaxFilter())
    previous = sys.unraisablehook

    def hook(unraisable):
        text = f"{unraisable.exc_value!r} {unraisable.object!r}"
        if "Event loop is closed" in text or "tensorstore" in text or "orbax" in text:
            log.debug("ignored after a failed read: %s", text)
            return
        previous(unraisable)

    sys.unraisablehook = hook


def release_stuck_threads() -> int:
    """Cancel Orbax's signalling threads still waiting for a write that failed, and set
    the signals they wait for, so they end (and the process can exit). Returns how many
    were released. Only call when no write of this process is still running."""
    try:
        from orbax.checkpoint._src.futures import future
    except ImportError:  # another Orbax layout: nothing we know to release
        return 0
    stuck = [t for t in threading.enumerate()
             if isinstance(t, getattr(future, "_SignalingThread", ())) and t.is_alive()]
    for thread in stuck:
        try:
            thread._cancelled = True
            future.set_signals(thread._receive_signals, operation_id=thread._operation_id)
        except Exception as e:  # an Orbax that changed its internals: say so, go on
            log.debug("could not release Orbax thread %s: %s", thread.name, e)
    for thread in stuck:  # Thread.join itself: Orbax's join raises once cancelled
        threading.Thread.join(thread, timeout=5)
    return len(stuck)


_at_exit: dict[int, Callable[[], None]] = {}  # what still runs at exit, by key


def _run_at_exit() -> None:
    while _at_exit:
        _, callback = _at_exit.popitem()
        callback()


def at_exit(callback: Callable[[], None]) -> int:
    """Call `callback()` at interpreter exit, before thread pools refuse work (Python's
    threading shutdown hooks), unless `cancel_at_exit(key)` with the returned key came
    first. The callback is held strongly: what it closes stays alive until then."""
    global _registered
    if not _registered:
        _registered = True
        register = getattr(threading, "_register_atexit", None)
        if register is None:  # not CPython >= 3.9: plain atexit, after the thread pools
            import atexit

            atexit.register(_run_at_exit)
        else:
            register(_run_at_exit)
    key = next(_keys)
    _at_exit[key] = callback
    return key


def cancel_at_exit(key: int) -> None:
    _at_exit.pop(key, None)


_registered = False
_keys = itertools.count()
