"""report.png: one picture of an elastic run, read from its plain data (report.json).

Five panels: on the step axis the loss; the device count and the mesh, every switch
marked (start-up, resume, device change, faster mesh); throughput per timing window by
mesh; then the try-runs of every search (the mesh run next in green); where the wall time
went (goodput and badput by cause, for the run and per mesh). Labels never overlap at the
default size: switch names sit in the device panel and search names above their bars,
each staggered in two rows (tests/test_report.py checks every text box).
"""

from __future__ import annotations

from meshscale.observe.goodput import NO_MESH, PRODUCTIVE

DPI = 80  # the default size: 880 x 1280 pixels
CAUSE_COLOURS = {PRODUCTIVE: "tab:green", "retrained": "tab:olive", "startup": "tab:grey",
                 "restore": "tab:brown", "checkpoint": "tab:blue",
                 "search_compile": "tab:purple", "search_tryrun": "tab:pink",
                 "switch": "tab:red", "idle": "lightgrey", "between_attempts": "black"}


def windows_of(data: dict) -> list[dict]:
    """Timing windows (first_step, step, losses, samples/s, mesh, devices): the run's
    metrics when report.json carries them, else built from its step records."""
    if data.get("windows"):
        return data["windows"]
    out = []
    for s in data.get("steps", []):
        if s.get("seconds") is None:
            continue
        out.append({"first_step": s["step"], "step": s["step"], "losses": [s["loss"]],
                    "samples_per_second": s["samples_per_second"], "mesh": s["mesh"],
                    "num_devices": s.get("num_devices")})
    return out


def switch_marks(events: list[dict]) -> list[tuple[int, str, str]]:
    """(step, mesh, why) for every switch, the start-up and resume ones included."""
    marks, why = [], "start-up"
    for e in events:
        if e["event"] in ("resume", "restart"):
            why = "resume"
        elif e["event"] == "devices_changed":
            why = f"{e.get('before')}->{e.get('after')} devices"
        elif e["event"] == "switch":
            reason = e.get("reason") or ""
            label = why if reason == "start" or why != "start-up" else reason
            marks.append((e.get("step") or 0, e["after"], label))
            why = "faster" if reason == "faster" else "start-up"
    return marks


def granted(events: list[dict]) -> list[tuple[int, int]]:
    """(step, devices granted from then on): at start or resume and at every change seen."""
    out = []
    for e in events:
        if e["event"] in ("start", "resume") and e.get("num_devices"):
            out.append((e.get("step") or e.get("checkpoint_step") or 0, e["num_devices"]))
        elif e["event"] == "devices_changed":
            out.append((e.get("step") or 0, e["after"]))
    return out


def plot(data: dict, path: str) -> str:
    """Write report.png for the run `data` (report.json's form) to `path`."""
    import matplotlib.pyplot as plt

    fig = figure(data)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def figure(data: dict):
    """The matplotlib figure of report.png (the caller closes it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    windows = windows_of(data)
    fig, axes = plt.subplots(5, 1, figsize=(11, 16), constrained_layout=True,
                             gridspec_kw={"height_ratios": [3, 2, 3, 3, 2]})
    marks = switch_marks(data.get("events", []))
    _loss(axes[0], windows, marks)
    _devices(axes[1], windows, marks, granted(data.get("events", [])))
    _throughput(axes[2], windows, data)
    _tryruns(axes[3], data.get("events", []))
    _goodput(axes[4], data.get("goodput") or (data.get("totals") or {}).get("goodput") or {})
    for ax in axes[:3]:
        ax.set_xlim(0, max([w["step"] for w in windows], default=1) + 1)
    return fig


def _loss(ax, windows, marks) -> None:
    steps = [s for w in windows for s in range(w["first_step"], w["step"] + 1)]
    losses = [x for w in windows for x in w["losses"]]
    ax.plot(steps, losses, color="black", lw=1)
    for step, _, _ in marks:
        ax.axvline(step, color="tab:red", ls="--", lw=0.8)
    ax.set(title="training loss (dashed: mesh switches, named in the panel below)",
           xlabel="step", ylabel="loss")


def _devices(ax, windows, marks, grants) -> None:
    xs, ys = [], []
    for w in windows:
        xs += [w["first_step"] - 1, w["step"]]
        ys += [w["num_devices"]] * 2
    ax.plot(xs, ys, color="tab:blue", lw=2, drawstyle="steps-post", label="in use by the mesh")
    if grants:
        end = max([w["step"] for w in windows], default=grants[-1][0])
        gx = [step for step, _ in grants] + [end]
        gy = [n for _, n in grants] + [grants[-1][1]]
        ax.plot(gx, gy, color="grey", ls="--", lw=1, drawstyle="steps-post",
                label="granted (seen at a poll)")
        ys += gy
    ax.legend(fontsize=8, loc="upper right")
    top = max(ys, default=1)
    ax.set_ylim(0, top * 1.9 + 1)
    for k, (step, mesh, why) in enumerate(marks):
        ax.axvline(step, color="tab:red", ls="--", lw=0.8)
        ax.annotate(f"{mesh}\n({why})", (step, top * (1.15 + 0.35 * (k % 2))), fontsize=8,
                    color="tab:red", ha="left", va="bottom", xytext=(3, 0),
                    textcoords="offset points")
    ax.set(title="devices in use over steps; each switch: the mesh it made and why",
           xlabel="step", ylabel="devices")


def _throughput(ax, windows, data) -> None:
    import matplotlib.pyplot as plt

    meshes = list(dict.fromkeys(w["mesh"] for w in windows))
    colours = plt.get_cmap("tab10")
    for i, mesh in enumerate(meshes):
        pts = [((w["first_step"] + w["step"]) / 2, w["samples_per_second"])
               for w in windows if w["mesh"] == mesh]
        ax.scatter(*zip(*pts, strict=True), s=10, color=colours(i % 10), label=mesh)
    longest = max((w["step"] - w["first_step"] + 1 for w in windows), default=1)
    ax.set(title=f"throughput per timing window (up to {longest} steps; shorter where a "
                 "save, search or switch cut it), by mesh", xlabel="step", ylabel="samples/s")
    if meshes:
        ax.legend(fontsize=8, markerscale=1.5, ncol=min(4, len(meshes)), loc="upper left")


def _tryruns(ax, events: list[dict]) -> None:
    """One bar per try-run, grouped by search; each group named above its bars."""
    from meshscale.app.report import chosen_after

    x, labels, ticks, tallest = 0, [], [], 0.0
    searches = [(e, chosen_after(events, i)) for i, e in enumerate(events)
                if e["event"] == "search"]
    groups = []
    for e, ran in searches:
        first = x
        for r in e["decision"].get("results", []):
            ok = r.get("status") == "ok"
            height = r.get("samples_per_second") or 0.0
            tallest = max(tallest, height)
            ax.bar(x, height, color="tab:green" if ok and r.get("shape") == ran
                   else ("tab:blue" if ok else "lightgrey"))
            labels.append(r.get("shape", "?"))
            ticks.append(x)
            x += 1
        groups.append((first, x - 1, e))
        x += 1
    ax.set_ylim(0, (tallest or 1.0) * 1.45)
    for k, (first, last, e) in enumerate(groups):
        ax.axvspan(first - 0.5, last + 0.5, color="grey", alpha=0.08, lw=0)
        where = "start" if e.get("step") is None else f"step {e['step']}"
        ax.annotate(f"{where}: {e.get('num_devices')} dev", ((first + last) / 2, 1.0),
                    xycoords=("data", "axes fraction"), xytext=(0, -4 - 11 * (k % 2)),
                    textcoords="offset points", ha="center", va="top", fontsize=8)
    ax.set_xticks(ticks, labels, rotation=60, fontsize=7)
    ax.set_xlim(-1, max(x - 1, 1))
    ax.set(title="try-runs at each search (green: the mesh run next; grey: skipped or "
                 "failed)", ylabel="samples/s")


def _goodput(ax, goodput: dict) -> None:
    rows = [("run", goodput)] + [("no mesh" if label == NO_MESH else label, part)
                                 for label, part in (goodput.get("per_mesh") or {}).items()]
    causes = list(dict.fromkeys(c for _, part in rows for c in part.get("seconds", {})))
    for y, (_, part) in enumerate(rows):
        left = 0.0
        for cause in causes:
            s = part.get("seconds", {}).get(cause, 0.0)
            ax.barh(y, s, left=left, color=CAUSE_COLOURS.get(cause, "tab:cyan"),
                    label=cause if y == 0 else None)
            left += s
        ax.text(left, y, f"  {part.get('goodput', 0):.0%}", va="center", fontsize=8)
    ax.set_yticks(range(len(rows)), [label for label, _ in rows], fontsize=8)
    ax.invert_yaxis()
    wall = goodput.get("wall_seconds", 0.0)
    ax.set(title=f"where the wall time went: goodput {goodput.get('goodput', 0):.0%} of "
                 f"{wall:.0f} s (productive steps / wall time), by cause",
           xlabel="seconds")
    if causes:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
