"""Goodput for people: where a run's wall time went, as a terminal table.

Reads the plain summary of `meshscale.observe.goodput` (``wall_seconds``, ``goodput``,
``seconds`` per cause, ``per_mesh``), from `ElasticTrainer.totals`, report.json or
``metrics.jsonl`` (`goodput.of_run`).
"""

from __future__ import annotations

from rich.table import Table

from meshscale.observe.goodput import NO_MESH, PRODUCTIVE

NO_MESH_WORDS = "no mesh"  # start-up before the first mesh, gaps between attempts

WORDS = {PRODUCTIVE: "training steps", "retrained": "steps trained again after a restart",
         "startup": "process start, JAX init, first state", "restore": "checkpoint reads",
         "checkpoint": "checkpoint saves and waits",
         "search_compile": "search: compiling candidates",
         "search_tryrun": "search: timed try-runs", "switch": "moving to a new mesh",
         "idle": "waiting", "between_attempts": "between attempts (restarts)"}


def goodput_line(goodput: dict) -> str:
    """"goodput 81% of 124.0 s wall time; badput: checkpoint 9%, switch 6%, ...": the wall
    time runs from the (first) process start to the run's last record (its close)."""
    wall = goodput.get("wall_seconds") or 0.0
    if not wall:
        return "goodput: no time recorded"
    bad = [(c, s) for c, s in goodput.get("seconds", {}).items() if c != PRODUCTIVE and s > 0]
    parts = ", ".join(f"{c} {s / wall:.0%}" for c, s in sorted(bad, key=lambda x: -x[1]))
    return f"goodput {goodput.get('goodput', 0):.0%} of {wall:.1f} s wall time" + (
        f"; badput: {parts}" if parts else "")


def goodput_table(goodput: dict) -> Table:
    """One row per cause: seconds and share of the wall time, for the run and per mesh
    (the mesh columns add up to the run's)."""
    meshes = list(goodput.get("per_mesh") or {})
    table = Table(title="where the time went", title_justify="left")
    table.add_column("cause")
    table.add_column("run s", justify="right")
    table.add_column("share", justify="right")
    for mesh in meshes:
        table.add_column(f"{NO_MESH_WORDS if mesh == NO_MESH else mesh} s", justify="right")
    wall = goodput.get("wall_seconds") or 0.0
    for cause, s in goodput.get("seconds", {}).items():
        per = [goodput["per_mesh"][m]["seconds"].get(cause, 0.0) for m in meshes]
        table.add_row(f"{cause} ({WORDS.get(cause, 'user-defined')})", f"{s:.1f}",
                      f"{s / wall:.0%}" if wall else "-", *(f"{x:.1f}" for x in per),
                      style="green" if cause == PRODUCTIVE else None)
    table.add_row("goodput", f"{wall:.1f}", f"{goodput.get('goodput', 0):.0%}",
                  *(f"{goodput['per_mesh'][m]['goodput']:.0%}" for m in meshes),
                  style="bold")
    return table
