"""The demo end to end: report.json, report.png, learning, and --resume after SIGKILL."""

import json
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from meshscale.models import registry

from meshscale import MeshShape, SwitchPolicy
from meshscale.app import cli
from meshscale.app.demo import DEFAULT_SCHEDULE, DemoConfig, elastic_trainer, parse_schedule, run
from meshscale.app.run_dir import RunDirRefused
from meshscale.elastic import resources
from meshscale.elastic.trainer import ElasticTrainer
from meshscale.errors import Interrupted
from meshscale.observe.writers import read_jsonl
from tests.helpers import contents, prefer_more_devices, read_only_tmpfs

# One worker runs the module, so the uninterrupted demo (module fixture) runs once.
pytestmark = pytest.mark.xdist_group("demo")

ROOT = pathlib.Path(__file__).resolve().parents[1]
ARGS = ["--model", "mlp", "--steps", "40", "--schedule", "4@0,8@10,6@20,3@30",
        "--check-every", "5", "--checkpoint-every", "5", "--batch", "24"]
# The shortest run that checkpoints (for the run-directory tests)
TINY = ["--model", "mlp", "--steps", "10", "--schedule", "4@0", "--check-every", "5",
        "--checkpoint-every", "5"]


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
    # metrics: every window's losses and mesh read back from metrics.jsonl; TensorBoard
    windows = [x for x in read_jsonl(run_dir / "metrics.jsonl") if x["kind"] == "window"]
    assert windows == report["windows"]
    losses = {s: x for w in windows for s, x in zip(range(w["first_step"], w["step"] + 1),
                                                    w["losses"], strict=True)}
    assert sorted(losses) == list(range(1, 41))
    np.testing.assert_allclose([losses[s["step"]] for s in report["steps"]],
                               [s["loss"] for s in report["steps"]], rtol=1e-6)
    assert all(MeshShape.parse(w["mesh"]).num_devices == w["num_devices"] for w in windows)
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    # goodput: every cause the demo goes through, summing to the wall time
    run_goodput = report["goodput"]
    assert sum(run_goodput["seconds"].values()) == pytest.approx(run_goodput["wall_seconds"])
    for cause in ("productive", "startup", "checkpoint", "switch", "search_tryrun"):
        assert run_goodput["seconds"][cause] > 0, cause
    assert run_goodput["attempts"] == 1 and 0 < run_goodput["goodput"] < 1
    # everything the run wrote is inside its run directory, the compile cache too
    assert any((run_dir / "jax_cache").iterdir())
    assert not (run_dir.parent / ".jax_cache").exists()


def test_report_command_re_renders_from_the_json(full_run, capsys):
    run_dir, _ = full_run
    (run_dir / "report.png").unlink()
    assert cli.main(["report", str(run_dir)]) == 0
    assert (run_dir / "report.png").read_bytes().startswith(b"\x89PNG")
    assert "time per mesh" in capsys.readouterr().out
    assert cli.main(["report", str(run_dir / "nowhere")]) == 2


def test_resume_after_sigkill_continues_with_the_uninterrupted_losses(full_run):
    full_dir, uninterrupted = full_run
    run_dir = full_dir.parent / "killed"
    shutil.copytree(full_dir, run_dir)  # --overwrite moves it aside, keeps its compiles
    child = subprocess.Popen(
        [sys.executable, "-m", "meshscale", "demo", *ARGS, "--run-dir", str(run_dir),
         "--overwrite"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    state_dir = run_dir / "checkpoints" / "state"
    try:
        deadline = time.time() + 300
        moved = run_dir.with_name("killed.old-1")  # the copy, moved aside by --overwrite
        while not (moved.is_dir() and state_dir.is_dir() and any(
                p.name.isdigit() and int(p.name) >= 10 for p in state_dir.iterdir())):
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
    assert 10 <= restart["step"] < 40  # from the killed run's checkpoint, steps to go
    after = {s["step"]: s["loss"] for s in resumed["steps"] if s["step"] > restart["step"]}
    expected = {s["step"]: s["loss"] for s in uninterrupted["steps"] if s["step"] in after}
    assert sorted(after) == list(range(restart["step"] + 1, 41))
    # goodput of both attempts: the killed one (a child) until its last record
    assert resumed["goodput"]["attempts"] == 2
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
    with pytest.raises(RunDirRefused, match=r"holds 1 entry \(precious.txt\): choose another "
                                            r"--run-dir, or pass --overwrite"):
        run(DemoConfig(model="mlp", run_dir=str(tmp_path)))
    assert [p.name for p in tmp_path.iterdir()] == ["precious.txt"]
    assert precious.read_text() == "keep me"


def test_a_re_run_into_a_previous_run_is_refused_and_the_run_kept_byte_for_byte(full_run,
                                                                               capsys):
    run_dir, _ = full_run
    before = contents(run_dir)
    assert cli.main(["demo", *ARGS, "--run-dir", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert err == (f"meshscale demo: error: --run-dir {run_dir} holds a run (checkpoints up to "
                   f"step 40): pass --resume to continue it, or --overwrite to start over (the "
                   f"old run is moved to {run_dir}.old-1, nothing is deleted)\n")
    assert contents(run_dir) == before
    assert not pathlib.Path(f"{run_dir}.old-1").exists()


def test_overwrite_moves_the_previous_run_aside_and_starts_a_new_one(full_run, tmp_path,
                                                                     capsys):
    old = tmp_path / "run"
    shutil.copytree(full_run[0], old)  # a previous run (its compile cache spares compiles)
    before = contents(old)
    assert cli.main(["demo", *TINY, "--run-dir", str(old), "--overwrite"]) == 0
    assert f"moved the previous {old} to {old}.old-1 (nothing deleted)" in capsys.readouterr().out
    assert contents(tmp_path / "run.old-1") == before
    report = json.loads((old / "report.json").read_text())
    assert [s["step"] for s in report["steps"]] == list(range(1, 11))  # the new run alone
    assert report["config"]["model"] == "mlp" and report["config"]["steps"] == 10
    assert any((old / "jax_cache").iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "run.old-1"]


def test_resume_with_nothing_to_resume_is_refused_and_creates_nothing(tmp_path, capsys):
    run_dir = tmp_path / "nowhere"
    assert cli.main(["demo", *TINY, "--run-dir", str(run_dir), "--resume"]) == 2
    assert capsys.readouterr().err == (
        f"meshscale demo: error: --resume: nothing to resume: --run-dir {run_dir} does not "
        f"exist: run without --resume to start a new run\n")
    run_dir.mkdir()
    (run_dir / "devices.txt").write_text("4\n")  # a run that stopped before its checkpoint
    assert cli.main(["demo", *TINY, "--run-dir", str(run_dir), "--resume"]) == 2
    assert "holds a run with no checkpoint: pass --overwrite instead" in capsys.readouterr().err
    assert cli.main(["demo", *TINY, "--run-dir", str(run_dir), "--resume", "--overwrite"]) == 2
    assert "--resume and --overwrite together" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["nowhere"]
    assert [p.name for p in run_dir.iterdir()] == ["devices.txt"]


def test_a_run_dir_that_cannot_be_written_is_refused_naming_run_dir(tmp_path, capsys):
    (tmp_path / "file").write_text("not a directory")
    assert cli.main(["demo", *TINY, "--run-dir", str(tmp_path / "file")]) == 2
    assert capsys.readouterr().err == (
        f"meshscale demo: error: --run-dir {tmp_path / 'file'}: it is a file, not a "
        f"directory: choose a writable directory\n")
    with read_only_tmpfs(tmp_path / "ro") as ro:
        assert cli.main(["demo", *TINY, "--run-dir", str(ro / "run")]) == 2
        assert capsys.readouterr().err == (
            f"meshscale demo: error: --run-dir {ro / 'run'}: {ro} is on a read-only file "
            f"system: choose a writable directory\n")


def test_an_interrupted_demo_writes_its_report_says_how_to_resume_and_exits_128_plus_signal(
        tmp_path, capsys, monkeypatch):
    """`ElasticTrainer.step` raises `Interrupted` once it has saved the step a SIGINT
    stopped at (faked here: the step is 5, a periodic checkpoint)."""
    run_dir = tmp_path / "run"
    step = ElasticTrainer.step

    def interrupted_at_5(self, state, batch):
        state, metrics = step(self, state, batch)
        if int(state.step) == 5:
            raise Interrupted("stopped", step=5, signal_number=signal.SIGINT,
                              directory=str(self.checkpoint_dir))
        return state, metrics

    with monkeypatch.context() as patch:
        patch.setattr(ElasticTrainer, "step", interrupted_at_5)
        assert cli.main(["demo", *TINY, "--run-dir", str(run_dir)]) == 130
    err = capsys.readouterr().err.splitlines()
    assert err[-1] == (f"stopped by SIGINT at step 5 (saved in {run_dir / 'checkpoints'}): "
                       f"resume with: meshscale demo --resume --run-dir {run_dir} --steps 10 "
                       f"--schedule 4@0 --model mlp --check-every 5 --checkpoint-every 5")
    stopped = json.loads((run_dir / "report.json").read_text())
    assert stopped["events"][-1]["event"] == "interrupted"
    assert [s["step"] for s in stopped["steps"]] == list(range(1, 6))
    # the printed command continues it, and the record runs on from the same run's
    resume = err[-1].split("resume with: meshscale ")[1].split()
    assert cli.main(resume) == 0
    resumed = json.loads((run_dir / "report.json").read_text())
    assert [s["step"] for s in resumed["steps"]] == list(range(1, 11))
    kinds = [e["event"] for e in resumed["events"]]
    assert kinds.index("interrupted") < kinds.index("restart")
    assert resumed["events"][kinds.index("restart")]["step"] == 5


def test_a_resumed_report_never_carries_another_runs_record(full_run, tmp_path, caplog):
    """A report.json that does not record the checkpoint resumed (here: another run's,
    copied in) is not prepended: the record starts anew, with a warning."""
    run_dir = tmp_path / "run"
    shutil.copytree(full_run[0], run_dir)
    foreign = json.loads((run_dir / "report.json").read_text())
    foreign["config"]["model"] = "gpt-tiny"
    (run_dir / "report.json").write_text(json.dumps(foreign))
    assert cli.main(["demo", *ARGS, "--steps", "42", "--run-dir", str(run_dir),
                     "--resume"]) == 0
    assert "records another run (model 'gpt-tiny', not 'mlp')" in caplog.text
    resumed = json.loads((run_dir / "report.json").read_text())
    assert [s["step"] for s in resumed["steps"]] == [41, 42]
    assert [e["event"] for e in resumed["events"]][0] == "restart"


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
                              switching=SwitchPolicy(measure=prefer_more_devices))
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
