"""Metrics writers: the loop's records on disk (JSONL, TensorBoard) or anywhere else.

`MetricWriter` is the protocol of `clu.metric_writers` (``write_scalars``,
``write_texts``, ``flush``, ``close``), so a clu writer, or a few lines around W&B or
MLflow, plugs in as is. `MetricsLog` is what the loop talks to: it takes plain records
(a closed timing window, an event), queues them and returns; one background thread
appends them to ``metrics.jsonl`` (always: it is the run's own record, read back by the
report and by the next attempt's goodput) and hands them to the writers, flushing them
whenever it has caught up (so a killed job keeps what it recorded). A writer that
raises is logged and dropped; training goes on. `close` drains the queue.

Never: block the loop on a write, or write from any process but process 0 (the caller
decides: a log built with ``enabled=False`` takes records and drops them).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from meshscale.errors import InvalidArgument
from meshscale.observe.plain import to_plain

log = logging.getLogger(__name__)

JSONL = "metrics.jsonl"
TENSORBOARD = "tensorboard"
FLUSH_SECONDS = 2
_STOP = object()


@runtime_checkable
class MetricWriter(Protocol):
    """Where metrics go: the protocol of `clu.metric_writers.MetricWriter` (the subset the
    loop uses). Called from one background thread, never from the training loop."""

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None: ...

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


class TensorBoardWriter:
    """TensorBoard event files in `logdir` (through ``tensorboardX``: the extra
    ``meshscale[tensorboard]``). tensorboardX's own thread writes them and reaches the
    disk at most `FLUSH_SECONDS` later: a killed job loses at most that much of them
    (``metrics.jsonl`` is flushed line by line)."""

    def __init__(self, logdir: str | os.PathLike):
        if not tensorboard_available():
            raise InvalidArgument(
                "TensorBoard event files need tensorboardX: pip install "
                "'meshscale[tensorboard]', or pass MetricsPolicy(tensorboard=False)")
        self.logdir = os.fspath(logdir)
        self._writer = None  # made at the first write: a job refused at start writes nothing

    @property
    def writer(self):
        if self._writer is None:
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(logdir=self.logdir, flush_secs=FLUSH_SECONDS)
        return self._writer

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, global_step=step)

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        for name, value in texts.items():
            self.writer.add_text(name, value, global_step=step)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def tensorboard_available() -> bool:
    try:
        import tensorboardX  # noqa: F401
    except ImportError:
        return False
    return True


class MetricsLog:
    """Process 0's record of the run: ``DIRECTORY/metrics.jsonl`` plus `writers`, written
    by a background thread. ``record`` never blocks (the queue is unbounded; records are a
    few hundred bytes per timing window)."""

    def __init__(self, directory: str | os.PathLike | None,
                 writers: Sequence[MetricWriter] = (), *, enabled: bool = True):
        for writer in writers:
            if not isinstance(writer, MetricWriter):
                raise InvalidArgument(f"{writer!r} is not a MetricWriter: it needs "
                                      "write_scalars, write_texts, flush and close")
        self.path = None if directory is None else os.path.join(os.fspath(directory), JSONL)
        self.writers = list(writers)
        self.enabled = enabled
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def record(self, line: Mapping[str, Any], scalars: Mapping[int, Mapping[str, float]] = {},
               texts: Mapping[int, Mapping[str, str]] = {}) -> None:
        """Queue `line` for the JSONL file and the per-step `scalars` / `texts` for the
        writers."""
        if not self.enabled:
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="meshscale-metrics",
                                            daemon=True)
            self._thread.start()
        self._queue.put((line, scalars, texts))

    def close(self, timeout: float = 60.0) -> None:
        """Write what is queued, flush and close every writer (waits at most `timeout`)."""
        if self._thread is None:
            for writer in self.writers:
                self._call(writer, "close")
            return
        self._queue.put(_STOP)
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("metrics: writers still busy after %.0f s; left behind", timeout)
        self._thread = None

    def _run(self) -> None:
        while (item := self._queue.get()) is not _STOP:
            line, scalars, texts = item
            self._write_line(line)
            for writer in list(self.writers):
                for step, values in scalars.items():
                    self._call(writer, "write_scalars", step, values)
                for step, values in texts.items():
                    self._call(writer, "write_texts", step, values)
                if self._queue.empty():  # caught up: on disk, so a killed job keeps it
                    self._call(writer, "flush")
        for writer in list(self.writers):
            self._call(writer, "flush")
            self._call(writer, "close")

    def _write_line(self, line: Mapping[str, Any]) -> None:
        if self.path is None:
            return
        try:  # opened per line: never held open (a killed job keeps every line written)
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps(to_plain(line)) + "\n")
        except OSError as e:
            log.warning("metrics: cannot write %s (%s); the JSONL record stops here",
                        self.path, e)
            self.path = None

    def _call(self, writer: MetricWriter, method: str, *args) -> None:
        try:
            getattr(writer, method)(*args)
        except Exception as e:  # a broken writer never stops training
            log.warning("metrics: %s.%s failed (%s: %s); the writer is dropped",
                        type(writer).__name__, method, type(e).__name__, e)
            if writer in self.writers:
                self.writers.remove(writer)


def read_jsonl(path: str | os.PathLike, *, tail_bytes: int | None = None) -> list[dict]:
    """The records of a ``metrics.jsonl`` (a line cut short by a kill is skipped); with
    `tail_bytes`, only those in the file's last `tail_bytes` bytes."""
    try:
        with open(path, "rb") as f:
            if tail_bytes is not None:
                start = max(0, f.seek(0, os.SEEK_END) - tail_bytes)
                f.seek(start)
                if start:
                    f.readline()  # the line the seek cut
            text = f.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return []
    lines = []
    for row in text.splitlines():
        try:
            lines.append(json.loads(row))
        except json.JSONDecodeError:
            continue
    return lines
