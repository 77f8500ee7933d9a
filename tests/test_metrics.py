"""Metrics and goodput: the files a run writes read back, and every second accounted.

The run under test is two real attempts of one job (tests/goodput_worker.py, child
processes): the first is killed by SIGKILL after step 11, the second resumes from the
step-10 checkpoint, trains step 11 again, switches meshes on a device change, and closes.
"""

import json
import math
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from meshscale import MetricsPolicy
from meshscale.errors import InvalidArgument
from meshscale.observe import goodput
from meshscale.observe.writers import MetricsLog, read_jsonl

# One worker runs the module: the two-attempt run (module fixture) is launched once.
pytestmark = pytest.mark.xdist_group("metrics")

ROOT = Path(__file__).resolve().parents[1]


def tensorboard_scalars(logdir: Path) -> dict[str, dict[int, list[float]]]:
    """tag -> step -> values, read from every TensorBoard event file under `logdir`
    (TFRecord framing: length, crc, an `Event` proto, crc)."""
    from tensorboardX.proto.event_pb2 import Event

    found: dict[str, dict[int, list[float]]] = {}
    for path in sorted(logdir.rglob("events.out.tfevents.*")):
        data = path.read_bytes()
        at = 0
        while at + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[at:at + 8])
            event = Event.FromString(data[at + 12:at + 12 + length])
            at += 12 + length + 4
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    found.setdefault(value.tag, {}).setdefault(event.step, []).append(
                        value.simple_value)
    return found


def attempt(directory: Path, steps: int, crash_after: int | None = None):
    args = [sys.executable, "-m", "tests.goodput_worker", str(directory), str(steps)]
    if crash_after is not None:
        args.append(str(crash_after))
    return subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.fixture(scope="module")
def restarted_run(tmp_path_factory):
    directory = tmp_path_factory.mktemp("run")
    start = time.time()
    first = attempt(directory, 20, crash_after=11)
    try:
        assert first.wait(timeout=240) == -9  # SIGKILL, as a preempted host
        second = attempt(directory, 20)
        try:
            line = second.stdout.readline()  # printed right after close()
            end = time.time()
            assert second.wait(timeout=240) == 0, line
        finally:
            second.kill()
    finally:
        first.kill()
    return directory, json.loads(line), end - start


def test_metrics_jsonl_reads_back_every_window_and_event(restarted_run):
    directory, _, _ = restarted_run
    lines = read_jsonl(directory / "metrics.jsonl")
    attempts = sorted({line["attempt"] for line in lines}, key=lambda a: min(
        x["time"] for x in lines if x["attempt"] == a))
    assert len(attempts) == 2
    for number, pid in enumerate(attempts):
        mine = [x for x in lines if x["attempt"] == pid]
        windows = [x for x in mine if x["kind"] == "window"]
        steps = [s for w in windows for s in range(w["first_step"], w["step"] + 1)]
        assert steps == (list(range(1, 12)) if number == 0 else list(range(11, 21)))
        for w in windows:
            assert len(w["losses"]) == w["step"] - w["first_step"] + 1
            assert all(math.isfinite(x) for x in w["losses"]) and w["mesh"]
            assert w["samples_per_second"] > 0 and w["num_devices"] in (4, 8)
        kinds = [x["event"] for x in mine if x["kind"] == "event"]
        assert kinds[:3] == (["start", "search", "switch"] if number == 0
                             else ["resume", "search", "switch"])
        assert "checkpoint" in kinds
    second = [x for x in lines if x["attempt"] == attempts[1]]
    assert "devices_changed" in [x.get("event") for x in second]
    assert second[-1]["kind"] == "close" and second[-1]["step"] == 20
    # step 11 was trained by the killed attempt: the resumed one trains it again
    first_window = next(x for x in second if x["kind"] == "window")
    assert first_window["first_step"] == 11 and first_window["retrained"] == 1
    assert {w["num_devices"] for w in second if w["kind"] == "window" and w["step"] > 12} == {8}


def test_tensorboard_event_files_hold_every_step_loss(restarted_run):
    directory, _, _ = restarted_run
    scalars = tensorboard_scalars(directory / "tensorboard")
    windows = [x for x in read_jsonl(directory / "metrics.jsonl") if x["kind"] == "window"]
    expected: dict[int, list[float]] = {}
    for w in windows:
        for step, loss in zip(range(w["first_step"], w["step"] + 1), w["losses"], strict=True):
            expected.setdefault(step, []).append(loss)
    assert set(scalars["loss"]) == set(expected) == set(range(1, 21))
    for step, losses in expected.items():
        assert sorted(scalars["loss"][step]) == pytest.approx(sorted(losses), rel=1e-6)
    last = windows[-1]["step"]
    assert scalars["goodput"][last][-1] == pytest.approx(windows[-1]["goodput"]["goodput"],
                                                         rel=1e-6)
    assert scalars["num_devices"][last] == [8.0]


def test_goodput_accounts_for_the_wall_time_of_a_restarted_run(restarted_run):
    directory, printed, wall = restarted_run
    run = goodput.of_run(read_jsonl(directory / "metrics.jsonl"))
    assert run["attempts"] == 2
    # measured outside both processes: from before the first started to the second's close
    assert run["wall_seconds"] == pytest.approx(wall, rel=0.02)
    seconds = run["seconds"]
    for cause in ("productive", "retrained", "startup", "restore", "checkpoint", "switch",
                  goodput.BETWEEN_ATTEMPTS):
        assert seconds.get(cause, 0) > 0, (cause, seconds)
    assert run["goodput"] == pytest.approx(seconds["productive"] / run["wall_seconds"])
    # per mesh: start-up before any mesh; the 4- and 8-device meshes trained
    meshes = run["per_mesh"]
    assert meshes[goodput.NO_MESH]["seconds"]["startup"] > 0
    assert sum(m["wall_seconds"] for m in meshes.values()) == pytest.approx(
        run["wall_seconds"])
    trained = {label for label, m in meshes.items() if m["seconds"].get("productive")}
    assert len(trained) >= 2 and goodput.NO_MESH not in trained
    # the second attempt's own ledger: causes agree with the events that timed themselves
    own = printed["goodput"]["seconds"]
    switched = sum(e["seconds"] for e in printed["events"] if e["event"] == "switch")
    assert own["switch"] <= switched + 0.05
    assert own["switch"] >= 0.5 * switched
    searched = sum(e["seconds"] for e in printed["events"] if e["event"] == "search")
    assert own.get("search_tryrun", 0) + own.get("search_compile", 0) == pytest.approx(
        searched, abs=0.05 + 0.05 * searched)


def test_ledger_charges_the_innermost_cause_and_moves_shares():
    now = [0.0]
    ledger = goodput.Ledger("startup", age=2.0, clock=lambda: now[0])
    now[0] = 1.0
    ledger.set_base("productive")
    now[0] = 4.0
    with ledger.spend("switch"):
        now[0] = 5.0
        with ledger.spend("checkpoint"):
            now[0] = 7.0
        now[0] = 8.0
    now[0] = 10.0
    ledger.move(1.5, "productive", "retrained")
    assert ledger.seconds == {"startup": 3.0, "productive": 3.5, "switch": 2.0,
                              "checkpoint": 2.0, "retrained": 1.5}
    assert ledger.snapshot()["wall_seconds"] == 12.0
    ledger.move(99.0, "retrained", "idle")  # never more than was charged
    assert ledger.seconds["idle"] == 1.5 and "retrained" not in ledger.seconds
    ledger.relabel("2x2/m4")  # time from here on is charged to this mesh too
    now[0] = 11.0
    assert ledger.per_mesh()["2x2/m4"] == {"productive": 1.0}
    assert ledger.per_mesh()[goodput.NO_MESH]["switch"] == 2.0
    assert ledger.snapshot()["per_mesh"]["2x2/m4"]["goodput"] == 1.0


def test_a_second_ledger_or_a_pooled_worker_starts_where_the_last_charge_ended():
    first = goodput.Ledger()  # this process's own time, from its start (the OS says)
    assert first.seconds["startup"] > 0
    time.sleep(0.2)
    second = goodput.Ledger()  # a second run in one process: the first charged till now
    assert second.seconds["startup"] < 0.1 + 0.2 + 0.05  # since first's last charge only
    goodput.begin_attempt()  # a pooled Ray worker given an attempt now
    assert goodput.Ledger().seconds["startup"] < 0.05


def test_combine_charges_the_gap_between_attempts():
    a = {"started_at": 100.0, "time": 130.0, "goodput": goodput.summary({"productive": 30.0})}
    b = {"started_at": 140.0, "time": 150.0, "goodput": goodput.summary(
        {"productive": 6.0, "startup": 4.0})}
    run = goodput.combine([b, a])
    assert run["seconds"] == {"productive": 36.0, goodput.BETWEEN_ATTEMPTS: 10.0,
                              "startup": 4.0}
    assert run["wall_seconds"] == 50.0 and run["attempts"] == 2
    assert run["per_mesh"][goodput.NO_MESH]["wall_seconds"] == 50.0


class Recorder:
    def __init__(self):
        self.scalars, self.texts, self.closed = [], [], False

    def write_scalars(self, step, scalars):
        self.scalars.append((step, dict(scalars)))

    def write_texts(self, step, texts):
        self.texts.append((step, dict(texts)))

    def flush(self):
        pass

    def close(self):
        self.closed = True


class Broken(Recorder):
    def write_scalars(self, step, scalars):
        raise OSError("the dashboard is down")


def test_metrics_log_feeds_writers_in_the_background_and_drops_a_broken_one(tmp_path, caplog):
    good, bad = Recorder(), Broken()
    log = MetricsLog(tmp_path, [good, bad])
    for step in range(3):
        log.record({"kind": "window", "step": step, "loss": float("nan") if step else 1.0},
                   {step: {"loss": 1.0}}, {step: {"mesh": "2x2/m4"}})
    log.close()
    assert good.scalars == [(0, {"loss": 1.0}), (1, {"loss": 1.0}), (2, {"loss": 1.0})]
    assert good.texts[-1] == (2, {"mesh": "2x2/m4"}) and good.closed
    assert log.writers == [good] and not bad.closed
    assert "the dashboard is down" in caplog.text and "dropped" in caplog.text
    lines = read_jsonl(tmp_path / "metrics.jsonl")
    assert [x["step"] for x in lines] == [0, 1, 2] and lines[1]["loss"] is None


def test_metrics_policy_refuses_what_it_cannot_honour():
    with pytest.raises(InvalidArgument, match="not a MetricWriter"):
        MetricsPolicy(writers=[object()])
    with pytest.raises(InvalidArgument, match="local path"):
        MetricsPolicy(directory="gs://bucket/run")
    with pytest.raises(InvalidArgument, match="tensorboard"):
        MetricsPolicy(tensorboard="yes")


def test_tensorboard_asked_for_without_tensorboardx_is_refused_at_once(monkeypatch):
    from meshscale.observe import writers

    monkeypatch.setattr(writers, "tensorboard_available", lambda: False)
    with pytest.raises(InvalidArgument, match="pip install 'meshscale\\[tensorboard\\]'"):
        MetricsPolicy(tensorboard=True)
    assert MetricsPolicy().tensorboard is None  # the default: when installed
