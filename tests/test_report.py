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
