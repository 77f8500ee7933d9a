"""The decision in words, as the demo prints it at each device change."""

import pytest

from meshscale.app.report import decision_words


def event(improvement, *, best="2x4/m4", switch=False, useful=None):
    return {"num_devices": 8, "decision": {
        "best": {"shape": best}, "baseline": {"shape": "4x1/m8"}, "improvement": improvement,
        "threshold": 0.05, "switch": switch, "max_useful_devices": useful}}


@pytest.mark.parametrize("improvement,switch,words", [
    (0.38, True, "8 devices: 2x4/m4 beats 4x1/m8 (current) by 38%, above the 5% threshold: "
                 "switching, 0.40 s"),
    (0.03, False, "8 devices: 2x4/m4 beats 4x1/m8 (current) by only 3%, not above the 5% "
                  "threshold: staying"),
    (-0.07, False, "8 devices: the fastest other mesh, 2x4/m4, is 7% slower than 4x1/m8 "
                   "(current): staying"),
])
def test_decision_words_say_by_how_much_and_what_happens(improvement, switch, words):
    switch_event = {"seconds": 0.4} if switch else None
    assert decision_words(event(improvement, switch=switch), switch_event) == words


def test_decision_words_say_why_a_faster_mesh_is_not_taken():
    stay = event(0.09)
    stay["decision"]["reason"] = ("stay: 9.0% faster, but it saves 1.2s over 20 remaining "
                                  "steps, not more than the switch cost 3.4s")
    assert decision_words(stay) == (
        "8 devices: 2x4/m4 beats 4x1/m8 (current) by 9%, above the 5% threshold: staying, "
        "since it saves 1.2s over 20 remaining steps, not more than the switch cost 3.4s")


def test_decision_words_name_the_current_mesh_and_the_useful_devices():
    words = decision_words(event(0.0, best="4x1/m8", useful=4))
    assert words == ("8 devices: the current mesh 4x1/m8 is the fastest measured: staying; "
                     "4 of the 8 devices give within 5% of the best throughput")
    no_baseline = {"num_devices": 3, "decision": {"best": {"shape": "2x1/m4"}, "switch": True}}
    assert decision_words(no_baseline) == "3 devices: 2x1/m4 is the fastest mesh found: switching"
    nothing = {"num_devices": 1, "decision": {"best": None, "reason": "no candidate ran"}}
    assert decision_words(nothing) == "1 device: no candidate ran"


def test_the_mesh_drawn_as_chosen_is_the_one_the_job_ran_on():
    """A search whose best try-run (2x3/m4) did not beat the threshold: the job stayed
    on 2x2/m4, which the table and the plot mark, not the best try-run."""
    from meshscale.app.report import chosen_after, tryrun_table

    stay = {"event": "search", "num_devices": 6, "decision": {
        "best": {"shape": "2x3/m4"}, "baseline": {"shape": "2x2/m4"}, "switch": False,
        "results": [{"shape": "2x2/m4", "status": "ok"}, {"shape": "2x3/m4", "status": "ok"}]}}
    moved = {**stay, "decision": {**stay["decision"], "switch": True}}
    events = [stay, {"event": "checkpoint"}, moved, {"event": "switch", "after": "2x3/m4"}]
    assert chosen_after(events, 0) == "2x2/m4"
    assert chosen_after(events, 2) == "2x3/m4"
    styles = [row.style for row in tryrun_table(stay["decision"]).rows]
    assert styles == ["bold green", None]
    styles = [row.style for row in tryrun_table(moved["decision"], chosen="2x3/m4").rows]
    assert styles == [None, "bold green"]


def demo_like_run() -> dict:
    """report.json's form for a run that started on 4 devices, grew to 8 at step 40, was
    restarted at step 60 and shrank to 3 at step 80 (windows of 10 steps)."""
    meshes = {4: "2x2/m4", 8: "2x4/m4", 3: "3x1/m6"}
    windows = []
    for first in range(1, 121, 10):
        n = 4 if first < 41 else 8 if first < 81 else 3
        windows.append({"first_step": first, "step": first + 9, "num_devices": n,
                        "losses": [5.0 / (first + k) for k in range(10)],
                        "samples_per_second": 40.0 * n, "mesh": meshes[n]})
    def search(step, n, shapes, chosen):
        return {"event": "search", "step": step, "num_devices": n, "decision": {
            "switch": True, "best": {"shape": chosen},
            "results": [{"shape": s, "status": "ok", "samples_per_second": 10.0 * (i + 1)}
                        for i, s in enumerate(shapes)]}}

    events = [{"event": "start", "step": None, "num_devices": 4},
              search(None, 4, ["2x2/m4", "4x1/m8", "3x1/m6"], "2x2/m4"),
              {"event": "switch", "step": None, "after": "2x2/m4", "reason": "start"},
              {"event": "devices_changed", "step": 40, "before": 4, "after": 8},
              search(40, 8, ["2x4/m4", "8x1/m16"], "2x4/m4"),
              {"event": "switch", "step": 40, "after": "2x4/m4", "reason": "faster"},
              {"event": "resume", "step": 60, "checkpoint_step": 60, "num_devices": 8},
              {"event": "switch", "step": 60, "after": "2x4/m4", "reason": "start"},
              {"event": "devices_changed", "step": 80, "before": 8, "after": 3},
              search(80, 3, ["3x1/m6"], "3x1/m6"),
              {"event": "switch", "step": 80, "after": "3x1/m6",
               "reason": "forced: current mesh lost devices"}]
    per_mesh = {"-": {"startup": 9.0, "between_attempts": 4.0},
                "2x2/m4": {"productive": 20.0, "switch": 2.0, "search_compile": 5.0},
                "2x4/m4": {"productive": 15.0, "checkpoint": 3.0, "retrained": 2.0,
                           "restore": 1.0},
                "3x1/m6": {"productive": 30.0, "switch": 1.0, "search_tryrun": 2.0}}
    from meshscale.observe import goodput

    total: dict[str, float] = {}
    for causes in per_mesh.values():
        for cause, seconds in causes.items():
            total[cause] = total.get(cause, 0.0) + seconds
    run = {**goodput.summary(total),
           "per_mesh": {m: goodput.summary(c) for m, c in per_mesh.items()}}
    return {"windows": windows, "events": events, "goodput": run, "steps": []}


def test_every_switch_is_marked_with_its_reason():
    from meshscale.app.picture import granted, switch_marks

    run = demo_like_run()
    assert switch_marks(run["events"]) == [
        (0, "2x2/m4", "start-up"), (40, "2x4/m4", "4->8 devices"),
        (60, "2x4/m4", "resume"), (80, "3x1/m6", "8->3 devices")]
    assert granted(run["events"]) == [(0, 4), (40, 8), (60, 8), (80, 3)]


def out_of_view(fig) -> set:
    """Tick labels matplotlib keeps but does not draw: their tick is outside the axis."""
    hidden = set()
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            low, high = sorted(axis.get_view_interval())
            for tick in axis.get_major_ticks():
                if not low - 1e-9 <= tick.get_loc() <= high + 1e-9:
                    hidden |= {tick.label1, tick.label2}
    return hidden


def test_report_png_labels_never_overlap_at_the_default_size(tmp_path):
    import matplotlib.pyplot as plt
    from matplotlib.text import Text

    from meshscale.app import picture

    fig = picture.figure(demo_like_run())
    try:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        width, height = fig.get_size_inches() * picture.DPI
        assert (width, height) == (880, 1280)
        texts = [t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()
                 and t not in out_of_view(fig)]
        boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in texts]
        marks = [b for name, b in boxes if "(" in name and "/m" in name]
        assert len(marks) == 4  # every switch is named
        for box in marks:  # inside the picture
            assert 0 <= box.x0 and box.x1 <= width and 0 <= box.y0 and box.y1 <= height
        overlapping = [(a, b) for i, (a, box_a) in enumerate(boxes)
                       for b, box_b in boxes[i + 1:] if box_a.overlaps(box_b)]
        assert not overlapping
        groups = [name for name, _ in boxes if name.endswith(" dev")]
        assert groups == ["start: 4 dev", "step 40: 8 dev", "step 80: 3 dev"]
        titles = " ".join(ax.get_title() for ax in fig.axes)
        assert "per timing window" in titles and "goodput 69% of 94 s" in titles
    finally:
        plt.close(fig)
    assert picture.plot(demo_like_run(), str(tmp_path / "r.png")).endswith("r.png")
    assert (tmp_path / "r.png").stat().st_size > 10_000


def test_goodput_table_and_line_give_every_cause_for_the_run_and_per_mesh():
    from meshscale.app.goodput_view import goodput_line, goodput_table

    run = demo_like_run()["goodput"]
    assert run["wall_seconds"] == 94.0
    assert goodput_line(run) == (
        "goodput 69% of 94.0 s wall time; badput: startup 10%, search_compile 5%, "
        "between_attempts 4%, switch 3%, checkpoint 3%, retrained 2%, search_tryrun 2%, "
        "restore 1%")
    table = goodput_table(run)
    assert [c.header for c in table.columns] == ["cause", "run s", "share", "no mesh s",
                                                 "2x2/m4 s", "2x4/m4 s", "3x1/m6 s"]
    causes = list(table.columns[0].cells)
    assert len(causes) == 10 and causes[-1] == "goodput"
    assert list(table.columns[4].cells)[-1] == "74%"  # 20 productive of 27 on 2x2/m4
    rows = list(zip(*(list(c.cells) for c in table.columns), strict=True))[:-1]
    for row in rows:  # the mesh columns add up to the run's
        assert sum(map(float, row[3:])) == pytest.approx(float(row[1]), abs=0.25)


def test_the_history_shows_the_cost_models_ranking_of_a_pruned_search():
    """A search the cost model pruned: beside the try-runs, every candidate's predicted
    and measured samples/s and why the rest did not run (the elastic run's report)."""
    import io

    from rich.console import Console

    from meshscale.app.report import print_history

    data = demo_like_run()
    for e in data["events"]:
        e.setdefault("seconds", 0.5)  # a switch's cost, as the job records it
    pruned = data["events"][4]["decision"]
    pruned["predictions"] = [
        {"rank": 1, "shape": "2x4/m4", "samples_per_second": 300.0,
         "measured_samples_per_second": 330.0, "verdict": "try-run"},
        {"rank": 2, "shape": "8x1/m16", "samples_per_second": 120.0,
         "verdict": "not run: ranked below the top 1"}]
    out = io.StringIO()
    print_history(data, Console(file=out, width=200))
    text = out.getvalue()
    assert text.count("cost model: predicted vs measured") == 1  # only the pruned search
    row = next(line for line in text.splitlines() if "8x1/m16" in line and "not run" in line)
    assert "120" in row
    assert "1.10" in next(line for line in text.splitlines()
                          if "2x4/m4" in line and "try-run" in line)
