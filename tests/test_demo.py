"""The demo end to end: report.json, report.png, learning, and --resume after SIGKILL."""

import json
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from meshscale import MeshShape, cli, resources
from meshscale.demo import DEFAULT_SCHEDULE, DemoConfig, elastic_trainer, parse_schedule, run
from models import registry
from tests.helpers import prefer_more_devices

# One worker runs the module, so the uninterrupted demo (module fixture) runs once.
pytestmark = pytest.mark.xdist_group("demo")

ROOT = pathlib.Path(__file__).resolve().parents[1]
ARGS = ["--model", "mlp", "--steps", "40", "--schedule", "4@0,8@10,6@20,3@30",
        "--check-every", "5", "--checkpoint-every", "5", "--batch", "24"]


@pytest.fixture(scope="session")  # once, even when xdist interleaves other modules
def full_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("demo") / "run"
    assert cli.main(["demo", *ARGS, "--run-dir", str(run_dir)]) == 0
    return run_dir, json.loads((run_dir / "report.json").read_text())


def test_demo_report_holds_every_change_decision_and_step(full_run):
    run_dir, report = full_run
    changes = [e for e in report["events"] if e["event"] == "devices_changed"]
    assert [e["after"] for e in changes] == [8, 6, 3]
    for change in changes:  # a search, with a decision, follows every change
        later = report["events"][report["events"].index(change):]
        search = next(e for e in later if e["event"] == "search")
        assert search["num_devices"] == change["after"]
        assert search["decision"]["reason"] and search["decision"]["results"]
    assert [s["step"] for s in report["steps"]] == list(range(1, 41))
    assert all(np.isfinite(s["loss"]) for s in report["steps"])
    assert report["steps"][-1]["loss"] < report["steps"][0]["loss"]
    assert report["machine"]["versions"]["jax"]
    png = (run_dir / "report.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000


def test_report_command_re_renders_from_the_json(full_run, capsys):
    run_dir, _ = full_run
    (run_dir / "report.png").unlink()
    assert cli.main(["report", str(run_dir)]) == 0
    assert (run_dir / "report.png").read_bytes().startswith(b"\x89PNG")
    assert "time per mesh" in capsys.readouterr().out
    assert cli.main(["report", str(run_dir / "nowhere")]) == 2


def test_resume_after_sigkill_continues_with_the_uninterrupted_losses(full_run):
    full_dir, uninterrupted = full_run
    # beside the first run: it finds the compile cache that run left there, as a second
    # demo run on a user's machine does
    run_dir = full_dir.parent / "killed"
    child = subprocess.Popen(
        [sys.executable, "-m", "meshscale.cli", "demo", *ARGS, "--run-dir", str(run_dir)],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    state_dir = run_dir / "checkpoints" / "state"
    try:
        deadline = time.time() + 300
        while not (state_dir.is_dir() and any(p.name.isdigit() and int(p.name) >= 10
                                              for p in state_dir.iterdir())):
            assert child.poll() is None, child.stderr.read().decode()[-3000:]
            assert time.time() < deadline
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
    assert cli.main(["demo", *ARGS, "--run-dir", str(run_dir), "--resume"]) == 0
    resumed = json.loads((run_dir / "report.json").read_text())
    restart = next(e for e in resumed["events"] if e["event"] == "restart")
    assert restart["step"] >= 10
    after = {s["step"]: s["loss"] for s in resumed["steps"] if s["step"] > restart["step"]}
    expected = {s["step"]: s["loss"] for s in uninterrupted["steps"] if s["step"] in after}
    assert sorted(after) == list(range(restart["step"] + 1, 41))
    np.testing.assert_allclose([after[k] for k in sorted(after)],
                               [expected[k] for k in sorted(after)], rtol=1e-5)


def test_bad_demo_flags_are_refused(capsys, tmp_path):
    with pytest.raises(ValueError, match="first entry must be at step 0"):
        parse_schedule("4@5,8@10", max_devices=8)
    with pytest.raises(ValueError, match="outside 1..8"):
        parse_schedule("4@0,16@10", max_devices=8)
    assert cli.main(["demo", "--schedule", "four@0"]) == 2
    assert "write DEVICES@STEP" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["demo", "--steps", "-3"])
    with pytest.raises(ValueError, match="unknown model"):
        run(DemoConfig(model="resnet", run_dir=str(tmp_path / "never")))
    assert not (tmp_path / "never").exists()  # nothing is created before the model builds


def test_a_fresh_demo_never_deletes_a_directory_it_did_not_make(tmp_path):
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    with pytest.raises(FileExistsError, match="holds no demo run"):
        run(DemoConfig(model="mlp", run_dir=str(tmp_path)))
    assert precious.read_text() == "keep me"


def test_the_demo_uses_seven_devices_when_that_is_the_fastest_try_run(tmp_path):
    """The default schedule's 7-device phase (not a multiple of p_min 2: vertical only):
    8 layers on 7 stages is a candidate, and the demo's trainer switches to it when its
    try-run is the fastest (measurements injected: timings on shared cores decide nothing
    in a test)."""
    assert 7 in [n for _, n in parse_schedule(DEFAULT_SCHEDULE, max_devices=8)]
    cfg = DemoConfig(run_dir=str(tmp_path / "run"))
    model, batch_fn = registry.build(cfg.model, cfg.seed)
    granted = {"count": 8}
    elastic = elastic_trainer(cfg, model, resources.Callback(lambda: granted["count"]),
                              search_options={"measure": prefer_more_devices})
    try:
        batch = batch_fn(cfg.global_batch, 0)
        state, _ = elastic.step(elastic.init(batch), batch)
        granted["count"] = 7
        state = elastic.check(state, batch)
        state, metrics = elastic.step(state, batch_fn(cfg.global_batch, 1))
    finally:
        elastic.close()
    assert metrics["mesh"] == "7x1/m24" and elastic.shape.num_devices == 7
    search = [e for e in elastic.history if e["event"] == "search"][-1]
    assert search["num_devices"] == 7
    assert search["decision"].best.shape == MeshShape(7, 1, 24)
    assert elastic.trainer.rows(elastic.shape) == 14  # 8 layers, 2 slots on each of 7 stages
