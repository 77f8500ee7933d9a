"""What a run looked like: rich tables for the terminal, report.json, report.png.

Everything here reads plain data (the JSON form of a run), so `meshscale report RUN_DIR`
re-renders exactly what the run printed and plotted. The core never imports this module
at import time; the terminal look lives here and in `cli.py` only.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from collections import defaultdict
from typing import Any

from rich.console import Console
from rich.table import Table

from meshscale.observe import goodput
from meshscale.observe.plain import to_plain
from meshscale.observe.writers import read_jsonl
from meshscale.planning.memory import format_bytes

__all__ = ["to_plain"]  # re-exported: the JSON form callers import from here


# -- plain data --------------------------------------------------------------------------
def machine() -> dict:
    import jax

    versions = {"python": sys.version.split()[0], "jax": jax.__version__}
    for name in ("flax", "optax", "orbax.checkpoint"):
        try:
            module = __import__(name, fromlist=["__version__"])
            versions[name] = getattr(module, "__version__", "?")
        except ImportError:  # pragma: no cover - all are dependencies
            versions[name] = "missing"
    from meshscale import __version__

    versions["meshscale"] = __version__
    return {"platform": platform.platform(), "processor": platform.machine(),
            "cpu_count": os.cpu_count(), "backend": jax.default_backend(),
            "device_kind": jax.devices()[0].device_kind, "device_count": jax.device_count(),
            "versions": versions}


def run_data(elastic, **extra) -> dict:
    """The JSON form of an `ElasticTrainer` run: the kept events and steps (the newest
    `history_limit`), the whole-run totals, the machine; from its ``metrics.jsonl``,
    every timing window and the goodput of the whole run (all its attempts)."""
    path = elastic.run_metrics.log.path
    lines = read_jsonl(path) if path else []
    totals = elastic.totals
    run = goodput.of_run(lines) if lines else totals.goodput
    return to_plain({"machine": machine(), "steps": elastic.steps, "events": elastic.history,
                     "totals": totals, "goodput": run,
                     "windows": [x for x in lines if x.get("kind") == "window"], **extra})


def chosen_after(events: list[dict], index: int) -> str | None:
    """The mesh the job ran on after the search at `events[index]`: the switch's target
    when one followed (before the next search), else the mesh it stayed on."""
    for e in events[index + 1:]:
        if e["event"] == "switch":
            return e.get("after")
        if e["event"] == "search":
            break
    decision = events[index]["decision"]
    return (decision.get("baseline") or {}).get("shape")


def write_json(data: dict, path: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


# -- words and tables ----------------------------------------------------------------------
def _num(v: Any, fmt: str = "{:.3g}") -> str:
    return "-" if v is None else fmt.format(v)


def tryrun_table(decision: dict, title: str = "", chosen: str | None = None) -> Table:
    """One row per try-run of a search (a decision in its plain form); the row of
    `chosen` (the mesh run after the decision; default: the best when switching, else the
    current mesh) in green."""
    table = Table(title=title or None, title_justify="left")
    for col in ("mesh", "kind", "compile s", "step s", "samples/s", "per device", "memory",
                "status"):
        table.add_column(col, justify="left" if col in ("mesh", "kind", "status") else "right")
    if chosen is None:
        chosen = ((decision.get("best") or {}).get("shape") if decision.get("switch")
                  else (decision.get("baseline") or {}).get("shape"))
    for r in decision.get("results", []):
        style = "bold green" if r.get("shape") == chosen and r.get("status") == "ok" else None
        table.add_row(r.get("shape", "?"), r.get("kind", ""), _num(r.get("compile_seconds"),
                      "{:.2f}"), _num(r.get("step_seconds"), "{:.4f}"),
                      _num(r.get("samples_per_second"), "{:.1f}"),
                      _num(r.get("samples_per_second_per_device"), "{:.1f}"),
                      format_bytes(r.get("bytes_per_device") or None), r.get("status", ""),
                      style=style)
    return table


def prediction_table(predictions: list[dict], title: str = "") -> Table:
    """The cost model's view of every candidate (plain `Prediction`s): predicted next to
    measured samples/s for each try-run, and why each other candidate was not run."""
    table = Table(title=title or None, title_justify="left")
    for col in ("rank", "mesh", "predicted samples/s", "measured samples/s",
                "measured / predicted", "predicted memory", "why"):
        table.add_column(col, justify="left" if col in ("mesh", "why") else "right")
    for p in predictions:
        measured = p.get("measured_samples_per_second")
        predicted = p.get("samples_per_second")
        table.add_row(str(p.get("rank") or "-"), p.get("shape", "?"), _num(predicted, "{:.4g}"),
                      _num(measured, "{:.4g}"),
                      _num(measured / predicted if measured and predicted else None, "{:.2f}"),
                      format_bytes(p.get("bytes_per_device") or None), p.get("verdict", ""))
    return table


def decision_words(search_event: dict, switch_event: dict | None = None) -> str:
    """"8 devices: 2x4/m4 beats 4x1/m8 (current) by 38%, above the 5% threshold: switching"."""
    d = search_event["decision"]
    n = search_event.get("num_devices")
    best = (d.get("best") or {}).get("shape")
    base = d.get("baseline") or {}
    text = f"{n} device{'' if n == 1 else 's'}: "
    if best is None:
        return text + (d.get("reason") or "no candidate ran")
    imp, thr = d.get("improvement"), d.get("threshold") or 0.0
    current = base.get("shape")
    if base and imp is not None:
        if best == current:
            text += f"the current mesh {best} is the fastest measured"
        elif imp > 0:
            text += (f"{best} beats {current} (current) by {'' if imp > thr else 'only '}"
                     f"{imp * 100:.0f}%, {'above' if imp > thr else 'not above'} the "
                     f"{thr * 100:.0f}% threshold")
        else:
            text += (f"the fastest other mesh, {best}, is {-imp * 100:.0f}% slower than "
                     f"{current} (current)")
    else:
        text += f"{best} is the fastest mesh found"
    if switch_event is not None:
        text += f": switching, {switch_event['seconds']:.2f} s"
    elif d.get("switch"):
        text += ": switching"
    elif imp is not None and imp > thr and "but " in (d.get("reason") or ""):
        text += f": staying, since {d['reason'].split('but ', 1)[1]}"  # the payback rule
    else:
        text += ": staying"
    useful = d.get("max_useful_devices")
    if useful is not None and n is not None and useful < n:
        text += f"; {useful} of the {n} devices give within 5% of the best throughput"
    return text


def summary(data: dict) -> dict:
    """Per-mesh time, steps and throughput; search and switch overhead; final loss.

    Per-mesh figures come from the run's totals when it has them (the step records are
    only the newest ones), else from the step records.
    """
    steps = data["steps"]
    per_mesh: dict[str, dict] = defaultdict(lambda: {"steps": 0, "seconds": 0.0, "samples": 0.0})
    totals = data.get("totals") or {}
    batch = next((s["samples_per_second"] * s["seconds"] for s in steps
                  if s.get("seconds") and s.get("samples_per_second")), None)
    if totals.get("steps_per_mesh") and batch:
        for mesh, n in totals["steps_per_mesh"].items():
            per_mesh[mesh].update(steps=n, seconds=totals["seconds_per_mesh"][mesh],
                                  samples=n * batch)
    for s in steps if not per_mesh else ():
        if s.get("seconds") is None:  # still in flight when the record was written
            continue
        m = per_mesh[s["mesh"]]
        m["steps"] += 1
        m["seconds"] += s["seconds"]
        m["samples"] += s["samples_per_second"] * s["seconds"]
    train_s = sum(m["seconds"] for m in per_mesh.values())
    search_s = sum(e.get("seconds", 0.0) for e in data["events"] if e["event"] == "search")
    switch_s = sum(e.get("seconds", 0.0) for e in data["events"]
                   if e["event"] in ("switch", "checkpoint"))
    total = train_s + search_s + switch_s
    return {
        "per_mesh": {k: {**v, "samples_per_second": v["samples"] / v["seconds"]}
                     for k, v in per_mesh.items() if v["seconds"] > 0},
        "train_seconds": train_s, "search_seconds": search_s, "switch_seconds": switch_s,
        "search_share": search_s / total if total else 0.0,
        "switch_share": switch_s / total if total else 0.0,
        "first_loss": steps[0]["loss"] if steps else None,
        "final_loss": steps[-1]["loss"] if steps else None,
    }


def summary_table(data: dict) -> Table:
    s = summary(data)
    table = Table(title="time per mesh", title_justify="left")
    for col in ("mesh", "steps", "seconds", "samples/s"):
        table.add_column(col, justify="left" if col == "mesh" else "right")
    for mesh, m in s["per_mesh"].items():
        table.add_row(mesh, str(m["steps"]), f"{m['seconds']:.1f}",
                      f"{m['samples_per_second']:.1f}")
    table.caption = f"loss {_num(s['first_loss'])} -> {_num(s['final_loss'])}"
    return table


def print_history(elastic_or_data, console: Console | None = None) -> None:
    """Every search with its try-run table (and the cost model's ranking where it pruned
    the search) and decision, then the summary."""
    data = elastic_or_data if isinstance(elastic_or_data, dict) else run_data(elastic_or_data)
    from meshscale.app import terminal

    console = console or terminal.console()
    events = data["events"]
    for i, e in enumerate(events):
        if e["event"] != "search":
            continue
        switch = next((x for x in events[i + 1:] if x["event"] in ("switch", "search")), None)
        switch = switch if switch and switch["event"] == "switch" else None
        console.print(tryrun_table(e["decision"], title=terminal.search_title(e),
                                   chosen=chosen_after(events, i)))
        if e["decision"].get("predictions"):  # a pruned search: the cost model's ranking
            console.print(prediction_table(e["decision"]["predictions"], title=(
                "cost model: predicted vs measured, and why the rest did not run")))
        console.print(decision_words(e, switch))
    console.print(summary_table(data))
    if data.get("goodput"):
        from meshscale.app import goodput_view

        console.print(goodput_view.goodput_table(data["goodput"]))


def plot(data: dict, path: str) -> str:
    """report.png (`meshscale.app.picture`)."""
    from meshscale.app import picture

    return picture.plot(data, path)


def render(run_dir: str) -> tuple[str, str]:
    """Re-render RUN_DIR/report.png and the terminal tables from RUN_DIR/report.json."""
    json_path = os.path.join(run_dir, "report.json")
    if not os.path.exists(json_path):
        raise FileNotFoundError(f"no report.json in {run_dir}: run `meshscale demo` first")
    with open(json_path) as f:
        data = json.load(f)
    png = plot(data, os.path.join(run_dir, "report.png"))
    print_history(data)
    return json_path, png
