"""What the elastic loop records for the people watching: metrics and goodput.

The loop hands over each closed timing window (its steps' losses were fetched by the
window's one block anyway, so metrics add no device sync) and each event; this turns
them into lines of ``metrics.jsonl`` and writer calls (`meshscale.observe.writers`,
written by a background thread on process 0), and keeps the run's `Ledger`. A restarted
attempt reads the highest step the earlier attempts trained from ``metrics.jsonl``: the
steps it trains again up to there are ``retrained`` time, not productive.
"""

from __future__ import annotations

import logging
import os
import time

from meshscale.elastic.options import MetricsPolicy
from meshscale.elastic.steplog import Window
from meshscale.observe import goodput, writers
from meshscale.runtime import distributed

log = logging.getLogger(__name__)


class RunMetrics:
    """The loop's `Ledger` and its `MetricsLog` (process 0 writes; others only count)."""

    def __init__(self, policy: MetricsPolicy, checkpoint_dir, ledger: goodput.Ledger):
        self.ledger = ledger
        self.directory = _directory(policy, checkpoint_dir)
        main = distributed.is_main()
        sinks = list(policy.writers)
        tensorboard = policy.tensorboard or (policy.tensorboard is None
                                             and writers.tensorboard_available())
        if policy.tensorboard is None and not tensorboard and main:
            log.info("metrics: tensorboardX is not installed, so no TensorBoard files (pip "
                     "install 'meshscale[tensorboard]'); metrics.jsonl is written")
        if main and tensorboard and self.directory is not None:
            sinks.append(writers.TensorBoardWriter(
                os.path.join(self.directory, writers.TENSORBOARD)))
        jsonl = self.directory if policy.jsonl else None
        self.log = writers.MetricsLog(jsonl, sinks, enabled=main)
        self.high_water = _high_water(self.log.path) if main and jsonl else None
        self.tags = {"attempt": os.getpid(), "started_at": ledger.started_at}

    def window(self, w: Window) -> None:
        """A closed timing window: charge its retrained steps, write its line."""
        again = sum(step <= self.high_water for step in w.steps) if self.high_water else 0
        self.high_water = max(self.high_water or 0, w.steps[-1])
        if again:
            self.ledger.move(again * w.seconds, goodput.PRODUCTIVE, "retrained")
        losses = [float(x) for x in w.losses]
        snapshot = self.ledger.snapshot()
        line = {"kind": "window", "time": time.time(), **self.tags, "first_step": w.steps[0],
                "step": w.steps[-1], "losses": losses,
                "loss": sum(losses) / len(losses), "samples_per_second": w.samples_per_second,
                "seconds_per_step": w.seconds, "mesh": w.mesh, "num_devices": w.num_devices,
                "retrained": again, "high_water": self.high_water, "goodput": snapshot}
        scalars = {step: {"loss": loss} for step, loss in zip(w.steps, losses, strict=True)}
        scalars[w.steps[-1]] = {**scalars[w.steps[-1]],
                                "samples_per_second (window)": w.samples_per_second,
                                "num_devices": w.num_devices, "goodput": snapshot["goodput"]}
        self.log.record(line, scalars, {w.steps[-1]: {"mesh": w.mesh}})

    def event(self, event, step: int) -> None:
        """An event: its JSON form as a line (with the goodput so far: an attempt killed
        before its first window still counts), one line of text for the writers."""
        data = event.as_dict()
        words = ", ".join(f"{k}={v}" for k, v in data.items()
                          if k not in ("event", "time", "step", "decision", "device_ids"))
        self.log.record({"kind": "event", **data, **self.tags,
                         "goodput": self.ledger.snapshot()}, {},
                        {step: {f"event/{data['event']}": words}})

    def close(self, step: int) -> dict:
        """The run's last line (its goodput), then drain and close the writers."""
        snapshot = self.ledger.snapshot()
        self.log.record({"kind": "close", "time": time.time(), **self.tags, "step": step,
                         "goodput": snapshot})
        self.log.close()
        return snapshot


def _directory(policy: MetricsPolicy, checkpoint_dir) -> str | None:
    if policy.directory is not None:
        return os.path.abspath(policy.directory)
    text = os.fspath(checkpoint_dir)
    if "://" in text:
        log.warning("metrics: the checkpoint directory %s is not local, so no metrics.jsonl "
                    "or TensorBoard files are written: pass metrics=MetricsPolicy("
                    "directory=LOCAL_DIR)", text)
        return None
    return text


def _high_water(path: str | None) -> int | None:
    """The highest step an earlier attempt trained: the last window line of
    ``metrics.jsonl`` carries the running maximum (only the file's tail is read)."""
    lines = writers.read_jsonl(path, tail_bytes=1 << 20) if path else []
    marks = [line.get("high_water", line["step"]) for line in lines
             if line.get("kind") == "window"]
    return marks[-1] if marks else None
