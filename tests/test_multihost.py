"""Several JAX processes on this machine (CPU, loopback): one job, as on a cluster of hosts.

Each test starts its own processes with `meshscale.runtime.launch` (bounded by a timeout; on a
failure or timeout the launcher stops them all) and checks what they wrote to tmp_path.
The processes share a JAX compilation cache, so later jobs load what earlier ones compiled.
"""

import functools
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from meshscale import MeshShape, Trainer
from meshscale.runtime.launch import launch
from tests import multihost_worker as worker
from tests.helpers import assert_trees_equal, make_model, make_optimizer

pytestmark = pytest.mark.xdist_group("multihost")  # one worker runs the module's jobs

ROOT = str(pathlib.Path(__file__).resolve().parents[1])
JOB_TIMEOUT = 240  # seconds per job, start-up and compiles included, on a loaded machine


def run_job(mode, out, run, *, processes, devices_per_process, cache_dir, status=0):
    """Launch `processes` workers; fail the test (with their output) unless the job ends
    with `status` (0: every process exited 0)."""
    lines = []
    cache = {"JAX_COMPILATION_CACHE_DIR": str(cache_dir),  # every entry, however small
             "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
             "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    ended = launch(["-m", "tests.multihost_worker", mode, str(out), str(run)],
                   processes=processes, devices_per_process=devices_per_process,
                   timeout=JOB_TIMEOUT, output=lines.append, cwd=ROOT, env=cache)
    text = "\n".join(line for line in lines if "[Gloo]" not in line)
    assert ended == status, f"{mode} on {processes}x{devices_per_process} exited {ended}:\n" \
                            f"{text[-6000:]}"
    results = [json.loads((out / f"{mode}-{p}.json").read_text()) for p in range(processes)]
    state = out / f"{mode}-state.npz"
    return results, dict(np.load(state)) if state.exists() else {}


# Session scope: xdist may run other modules' tests between this module's, and a module
# fixture would then be torn down and its jobs launched again.
@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("jax_cache")


@pytest.fixture(scope="session")
def two_process_job(tmp_path_factory, cache_dir):
    """2 processes x 4 devices: plain steps, three searches, a restore past a step damaged
    for one process, an elastic run to step 5; then process 1 is killed mid-step."""
    out = tmp_path_factory.mktemp("job")
    results, saved = run_job("job", out, out / "run", processes=2, devices_per_process=4,
                             cache_dir=cache_dir, status=-signal.SIGKILL)
    stopped = time.time()
    return out, results, saved, stopped - float((out / "killed-at").read_text())


def one_process_losses():
    """The same training on one process with 8 devices (this test process), 2x4 mesh:
    the first TRAIN_STEPS steps of the run the preempted job is compared with (one
    trainer and one compile serve both)."""
    return one_process_losses_to(worker.PREEMPT_END)[: worker.TRAIN_STEPS]


def test_pipelined_step_across_two_processes_matches_one_process(two_process_job):
    _, results, _, _ = two_process_job
    expected = one_process_losses()[: worker.STEPS]
    for result in results:
        for shape in worker.SHAPES:  # 2x4 and 4x2, both spanning the two processes
            np.testing.assert_allclose(result["losses"][shape], expected, rtol=1e-5,
                                       err_msg=shape)
    assert results[0]["losses"] == results[1]["losses"]
    # each process held half the batch: odd steps were fed its rows only
    assert [r["local_rows"]["2x4/m2"] for r in results] == [[0, 12], [12, 24]]


def test_search_across_two_processes_ends_in_one_decision(two_process_job):
    _, results, _, _ = two_process_job
    first, second = results
    for kind in ("measured", "injected"):
        assert first[kind] == second[kind], f"{kind}: the processes decided differently"
        assert first[kind]["switch"] and first[kind]["best"]["shape"] in worker.CANDIDATES
    # real try-runs: every candidate ran, timed as its slowest process
    assert [r["shape"] for r in first["measured"]["results"]] == list(worker.CANDIDATES)
    assert [r["status"] for r in first["measured"]["results"]] == ["ok"] * 3
    # measurements that differ per process: process 0's decision (deep pipe) holds for all
    assert first["injected"]["best"]["shape"] == "4x2/m2"


def test_elastic_run_across_two_processes_follows_process_0s_device_poll(two_process_job):
    """8 devices, then 6 (process 0's poll; the other process's source kept saying 8)."""
    _, results, _, _ = two_process_job
    first, second = results
    assert first["elastic_losses"] == second["elastic_losses"]
    np.testing.assert_allclose(first["elastic_losses"], one_process_losses(), rtol=1e-5)
    assert first["events"] == second["events"]
    changes = [e for e in first["events"] if e["event"] == "devices_changed"]
    assert [e["after"] for e in changes] == [6]
    switch = [e for e in first["events"] if e["event"] == "switch"][-1]
    assert switch["reason"].startswith("forced") and switch["num_devices"] <= 6
    assert MeshShape.parse(first["mesh"]).num_devices <= 6


@pytest.mark.parametrize("processes,devices_per_process", [(1, 4), (4, 2)])
def test_restart_with_another_process_count_restores_exactly_and_trains_on(
        two_process_job, tmp_path, cache_dir, processes, devices_per_process):
    """Saved by 2 processes x 4 devices; resumed by 1 x 4 and by 4 x 2."""
    out, _, saved, _ = two_process_job
    shutil.copytree(out / "run", tmp_path / "run")  # each restart gets its own copy
    results, restored = run_job("resume", tmp_path, tmp_path / "run", processes=processes,
                                devices_per_process=devices_per_process, cache_dir=cache_dir)
    assert_trees_equal(restored, saved)
    for result in results:
        assert result["first_step"] == worker.SAVED_STEP
        assert result["processes"] == processes
        # the last steps of a run that was never restarted, on this job's devices
        np.testing.assert_allclose(result["losses"],
                                   one_process_losses()[worker.SAVED_STEP:], rtol=1e-5)
    assert MeshShape.parse(results[0]["mesh"]).num_devices <= processes * devices_per_process


def test_a_try_run_failing_on_one_process_is_skipped_by_both(two_process_job):
    """Placing the 4x2 try-run's copy failed on process 1 only: both skip 4x2 (no hang:
    the job went on), with the failing process's words, and decide alike."""
    _, results, _, _ = two_process_job
    first, second = (r["one_sided"] for r in results)
    assert first == second
    status = {r["shape"]: r["status"] for r in first["results"]}
    assert status["4x2/m2"].startswith("failed: MemoryError: simulated")
    assert status["4x2/m2"].endswith("(on process 1)")
    assert status["2x4/m2"] == status["3x2/m2"] == "ok"
    assert first["best"]["shape"] in ("2x4/m2", "3x2/m2")


def test_a_step_damaged_for_one_process_only_is_skipped_by_both(two_process_job):
    _, results, _, _ = two_process_job
    assert [r["damaged"] for r in results] == [
        {"restored_step": 1, "skipped": [2], "equal": True}] * 2


def test_a_process_killed_mid_step_stops_the_job_within_seconds(two_process_job):
    """Process 1 was SIGKILLed in the middle of a step, process 0 left waiting inside it:
    the launcher ended the job with the killed process's status (the fixture checks it),
    soon after. The restart tests resume from that job's checkpoint."""
    *_, seconds_to_stop = two_process_job
    assert 0 <= seconds_to_stop < 30


def test_launch_stops_every_process_when_one_fails(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(f"""
        import os, pathlib, time
        me = os.environ["MESHSCALE_PROCESS_ID"]
        pathlib.Path({str(tmp_path)!r}, me).write_text(str(os.getpid()))
        if me == "1":
            while not pathlib.Path({str(tmp_path)!r}, "0").exists():
                time.sleep(0.05)
            raise SystemExit(3)
        time.sleep(120)
    """))
    lines = []
    start = time.monotonic()
    status = launch([str(script)], processes=2, devices_per_process=1, timeout=60,
                    output=lines.append)
    assert status == 3 and time.monotonic() - start < 30, lines
    assert "[launch] process 1 exited with 3: stopping the others" in lines
    pid = int((tmp_path / "0").read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # process 0 was stopped and reaped


def test_launch_stops_every_process_on_timeout(tmp_path):
    script = tmp_path / "child.py"
    script.write_text("import time\nprint('started', flush=True)\ntime.sleep(120)\n")
    lines = []
    start = time.monotonic()
    status = launch([str(script)], processes=2, devices_per_process=1, timeout=3,
                    output=lines.append)
    assert status == 124 and time.monotonic() - start < 20
    assert sorted(lines[:2]) == ["[p0] started", "[p1] started"]


def test_launch_command_passes_its_script_and_exit_status(tmp_path, capsys):
    from meshscale.app.cli import main

    script = tmp_path / "child.py"
    script.write_text("import os, sys\nprint(os.environ['MESHSCALE_PROCESS_ID'], sys.argv[1:],"
                      " os.environ['XLA_FLAGS'])\nsys.exit(int(sys.argv[1]))\n")
    assert main(["launch", "--processes", "2", "--devices-per-process", "3", "--timeout",
                 "60", "--", str(script), "0"]) == 0
    out = capsys.readouterr().out
    assert "[p0] 0 ['0']" in out and "[p1] 1 ['0']" in out
    assert out.count("--xla_force_host_platform_device_count=3") == 2
    assert main(["launch", "--processes", "1", "--", str(script), "5"]) == 5
    assert main(["launch", "--processes", "2"]) == 2


@functools.cache
def one_process_losses_to(steps):
    """`steps` losses of the same training on one process with 8 devices, 2x4 mesh."""
    shape = MeshShape(2, 4, 2)
    trainer = Trainer(make_model("mlp"), make_optimizer(), global_batch=worker.BATCH)
    state, step, losses = trainer.init_state(shape), trainer.compile_step(shape), []
    for batch in worker.host_batches(steps):
        state, metrics = step(state, trainer.put_batch(batch, shape))
        losses.append(float(metrics["loss"]))
    return losses


def test_exit_without_close_then_sigterm_keep_every_step_of_a_two_process_job(
        tmp_path, cache_dir):
    """Three jobs on one run directory, as a cluster would run them:
    1. 2 processes return from their script without close(): their exit hooks save step
       TRAIN_STEPS together (the periodic checkpoint was at SAVED_STEP);
    2. 2 processes resume there; SIGTERM to `meshscale launch` reaches both, they stop
       at the same step, save it and exit 143 within the grace time;
    3. 1 process x 4 devices resumes from that step.
    Every loss equals an uninterrupted run's."""
    out, run = tmp_path, tmp_path / "run"
    lines = []
    status = launch(["-m", "tests.multihost_worker", "unclosed", str(out), str(run)],
                    processes=2, devices_per_process=4, timeout=JOB_TIMEOUT,
                    output=lines.append, cwd=ROOT,
                    env={"JAX_COMPILATION_CACHE_DIR": str(cache_dir),  # job 2 loads them
                         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
                         "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"})
    text = "\n".join(lines)
    assert status == 0, text[-4000:]
    assert "Traceback" not in text and "cannot schedule new futures" not in text, text[-4000:]

    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(cache_dir),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    job = subprocess.Popen(
        [sys.executable, "-m", "meshscale", "launch", "--processes", "2",
         "--devices-per-process", "4", "--timeout", str(JOB_TIMEOUT), "--",
         "-m", "tests.multihost_worker", "preempt", str(out), str(run)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + JOB_TIMEOUT
        while not (out / "training").exists():
            assert job.poll() is None, job.stdout.read()[-4000:]
            assert time.time() < deadline, "the job never started training"
            time.sleep(0.1)
        job.send_signal(signal.SIGTERM)
        signalled = time.time()
        text, _ = job.communicate(timeout=90)
        assert time.time() - signalled < 70, "the job did not stop within the grace time"
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    assert job.returncode == 128 + signal.SIGTERM, text[-4000:]
    results = [json.loads((out / f"preempt-{p}.json").read_text()) for p in (0, 1)]
    first, saved = results[0]["first_step"], results[0]["saved"]
    assert first == worker.TRAIN_STEPS  # job 1's last step, saved at its exit
    assert saved is not None and results[1]["saved"] == saved, results
    assert first < saved < worker.PREEMPT_END
    # step() trained and saved step `saved`, then raised: its loss never reached the loop
    assert results[0]["losses"] == results[1]["losses"]
    assert len(results[0]["losses"]) == saved - first - 1
    assert "stopped by SIGTERM after step" in text and "Traceback" not in text

    finished, _ = run_job("finish", out, run, processes=1, devices_per_process=4,
                          cache_dir=cache_dir)
    assert finished[0]["first_step"] == saved
    reference = one_process_losses_to(worker.PREEMPT_END)
    np.testing.assert_allclose(results[0]["losses"], reference[first:saved - 1], rtol=1e-5)
    np.testing.assert_allclose(finished[0]["losses"], reference[saved:], rtol=1e-5)
