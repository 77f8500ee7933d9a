"""Ahead-of-time compiled executables, kept so a mesh is compiled at most once.

Keyed by everything the executable bakes in (`Trainer.step_key`: mesh shape, device ids,
parameter shapes, the model's graph definition, the optimizer object itself, batch spec,
remat, donation); the key holds the optimizer and graphdef, so neither can be freed and
its id reused while the entry lives. Bounded (least recently used entries are dropped);
every lookup is counted as a hit or a miss, and every compile with its seconds and
origin ("on-demand" or "background"), so callers can prove from the record, not from
wall time, that nothing was compiled again. The counters are exact for the cache's whole
life; the event list keeps the newest `max_events` only (a long job would otherwise grow
it without end).
JAX's persistent compilation cache (`enable_persistent_cache`) sits underneath: it
survives a process restart, this one lives in memory.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable, Hashable
from typing import Any

import jax
from jax.experimental.compilation_cache import compilation_cache as cc

from meshscale.runtime.paths import run_path

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class CompileEvent:
    key: Hashable
    outcome: str  # "hit" | "miss" | "evict"
    seconds: float = 0.0
    origin: str = ""  # for misses: "on-demand" | "background"


class CompileCache:
    """An LRU map from key to compiled executable, with a hit/miss record."""

    def __init__(self, maxsize: int = 32, *, max_events: int = 1000):
        if maxsize < 1:
            raise ValueError(f"CompileCache maxsize must be >= 1, got {maxsize}")
        self.maxsize = maxsize
        self._entries: collections.OrderedDict[Hashable, Any] = collections.OrderedDict()
        self._origin: dict[Hashable, str] = {}
        self._lock = threading.RLock()
        self._key_locks: dict[Hashable, threading.Lock] = {}
        self.events: collections.deque[CompileEvent] = collections.deque(maxlen=max_events)
        self.recorded = 0  # events ever recorded (the deque keeps the newest)
        self._counts: collections.Counter[tuple[str, str]] = collections.Counter()
        self._compile_seconds = 0.0

    def _record(self, event: CompileEvent) -> None:
        self.events.append(event)
        self.recorded += 1
        self._counts[event.outcome, event.origin] += 1
        self._compile_seconds += event.seconds

    def events_since(self, recorded: int) -> list[CompileEvent]:
        """The events recorded after `recorded` was read (those still kept)."""
        with self._lock:
            return list(self.events)[max(0, len(self.events) - (self.recorded - recorded)):]

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def origin(self, key: Hashable) -> str | None:
        """How the cached entry for `key` was made ("on-demand" / "background"), if cached."""
        with self._lock:
            return self._origin.get(key) if key in self._entries else None

    def get(self, key: Hashable, compile_fn: Callable[[], Any], *,
            origin: str = "on-demand") -> Any:
        """The executable for `key`, compiling it with `compile_fn()` on a miss."""
        with self._lock:
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:  # two callers of the same key compile once
            with self._lock:
                if key in self._entries:
                    self._entries.move_to_end(key)
                    self._record(CompileEvent(key, "hit"))
                    return self._entries[key]
            start = time.perf_counter()
            value = compile_fn()
            seconds = time.perf_counter() - start
            with self._lock:
                self._record(CompileEvent(key, "miss", seconds, origin))
                self._entries[key] = value
                self._origin[key] = origin
                while len(self._entries) > self.maxsize:
                    old, _ = self._entries.popitem(last=False)
                    self._origin.pop(old, None)
                    self._record(CompileEvent(old, "evict"))
            log.debug("compiled %s in %.2fs (%s)", key, seconds, origin)
            return value

    def count(self, outcome: str, origin: str | None = None) -> int:
        return sum(n for (o, g), n in self._counts.items()
                   if o == outcome and (origin is None or g == origin))

    @property
    def compiles(self) -> int:
        return self.count("miss")

    def stats(self) -> dict[str, float]:
        return {
            "hits": self.count("hit"),
            "misses": self.count("miss"),
            "background": self.count("miss", "background"),
            "evictions": self.count("evict"),
            "compile_seconds": self._compile_seconds,
            "size": len(self._entries),
        }


_PERSISTENT = {"hits": 0, "misses": 0}
_listening = False


def _count_persistent(event: str, **_) -> None:
    if event == "/jax/compilation_cache/cache_hits":
        _PERSISTENT["hits"] += 1
    elif event == "/jax/compilation_cache/cache_misses":
        _PERSISTENT["misses"] += 1


def persistent_cache_stats() -> dict[str, int]:
    """Executables loaded from (hits) and written to (misses) the persistent cache so far."""
    return dict(_PERSISTENT)


def enable_persistent_cache(directory: str | os.PathLike) -> str:
    """Turn on JAX's persistent compilation cache in `directory` (every entry kept).

    Put `directory` on storage shared by all hosts (and kept across restarts) so that a
    job restarted by its scheduler loads its executables instead of compiling them.
    Safe to call after JAX has compiled something: the cache is re-initialised.
    """
    global _listening
    where = run_path(directory)
    where.mkdir(parents=True, exist_ok=True)
    path = os.fspath(where)
    if not _listening:
        jax.monitoring.register_event_listener(_count_persistent)
        _listening = True
    if jax.config.jax_compilation_cache_dir != path:
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
        cc.reset_cache()  # a cache checked (and found off) before must be looked at again
    return path
