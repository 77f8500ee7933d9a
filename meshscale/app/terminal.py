"""What the `meshscale` commands show besides the report tables: the console (wide when
output is a file, silent under ``-q``), the try-run progress bar, and events in words.

The core never imports this module: the library reports through events, logging and
`search(progress=...)`; how that looks on a terminal is decided here and in `report.py`.
"""

from __future__ import annotations

import os
import sys

from rich.console import Console

WIDE = 200  # columns of a console writing to a file or pipe (COLUMNS overrides)
_settings = {"quiet": False}


def configure(*, quiet: bool) -> bool:
    """Set ``-q`` for every console made after; returns the previous setting."""
    before, _settings["quiet"] = _settings["quiet"], quiet
    return before


def quiet() -> bool:
    return _settings["quiet"]


def width() -> int | None:
    """None (the terminal's own) on a terminal; else COLUMNS when set, else `WIDE`, so a
    table written to a file or a pipe is never cut to 80 columns."""
    if sys.stdout.isatty():
        return None
    columns = os.environ.get("COLUMNS", "")
    return int(columns) if columns.isdigit() and int(columns) > 0 else WIDE


def console() -> Console:
    """The console a command prints on (quiet under ``-q``)."""
    return Console(width=width(), quiet=quiet())


class TryRunBar:
    """`search(progress=...)` as a rich progress display: one bar per try-run, running
    while it compiles and steps, then its samples/s (or why it did not run)."""

    def __init__(self, console: Console):
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(TextColumn("{task.description}"), BarColumn(bar_width=24),
                                 TimeElapsedColumn(), TextColumn("{task.fields[outcome]}"),
                                 console=console)
        self.task = None

    def __call__(self, p) -> None:  # p: meshscale.planning.search.TryRunProgress
        if p.result is None:
            if p.index == 0:
                self.progress.start()
            self.task = self.progress.add_task(
                f"try-run {p.index + 1}/{p.total}: {p.candidate.shape} ({p.candidate.kind})",
                total=None, outcome="")
            return
        r = p.result
        outcome = (f"{r.samples_per_second:.1f} samples/s, compile {r.compile_seconds:.1f} s"
                   if r.ok else r.status)
        self.progress.update(self.task, total=1, completed=1, outcome=outcome)
        if p.index + 1 == p.total:
            self.progress.stop()

    def close(self) -> None:
        """Stop the display (also when the search raised half-way)."""
        self.progress.stop()


def search_title(event) -> str:
    """"start-up search on 4 devices" / "search at step 90 on 8 devices" (an event or its
    JSON form)."""
    step, n = event["step"], event["num_devices"]
    where = "start-up search" if step is None else f"search at step {step}"
    return f"{where} on {n} device{'' if n == 1 else 's'}"


def event_line(event, *, check_every: int | None = None) -> str | None:
    """One line for a device change or a resume (an event or its JSON form); None for
    other kinds. A change is seen at the first poll after it, so the line names the step
    of that poll and how often the device source is polled."""
    kind = event["event"]
    if kind == "devices_changed":
        poll = f"; devices are polled every {check_every} steps" if check_every else ""
        return (f"[bold]devices changed[/]: {event['before']} -> {event['after']} "
                f"(seen at step {event['step']}{poll})")
    if kind == "resume":
        return (f"[bold]resumed[/] from the checkpoint of step {event['checkpoint_step']} "
                f"on {event['num_devices']} devices")
    return None


def ruled_out_line(decision) -> str:
    """The meshes a search's rule left out, and why, on one line (`Decision.ruled_out`)."""
    return "not tried: " + "; ".join(map(str, decision.ruled_out))
