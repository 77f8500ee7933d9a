"""Never lose work (DESIGN.md): a run keeps every step it promises through an exit without
close(), SIGTERM, SIGINT, a NaN, a failed save, a second job and flipped bytes, and a
wrong batch is refused in one line before it costs the state.

Faults that end a process run in a child script (`child`); every child is killed and
waited for when its test ends. Resumed losses are compared with an uninterrupted run on
a fixed mesh (`fixed_mesh_run`)."""

import contextlib
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from meshscale import CheckpointPolicy, SwitchPolicy, Timing
from meshscale.elastic import resources
from meshscale.errors import InvalidBatch, NonFiniteStep, RunDirectoryLocked
from meshscale.store.checkpoint import Checkpointer
from tests.helpers import prefer_more_devices
from tests.test_elastic import (
    BATCHES,
    close_trainers,  # noqa: F401  (autouse: closes each test's trainers)
    elastic,
    events,
    fixed_mesh_run,
)

pytestmark = pytest.mark.xdist_group("never_lose_work")

ROOT = pathlib.Path(__file__).resolve().parents[1]
REFERENCE_STEPS = 30  # len(BATCHES): one uninterrupted run serves every comparison
CHILD_START = 240  # seconds a child may take to import, compile and reach its marker


# -- helpers ---------------------------------------------------------------------------
def four_devices(tmp_path, **options):
    """An ElasticTrainer on 4 devices in tmp_path/"run"; try-runs are not timed.
    `options`: `elastic`'s (checkpoints=, timing=, skip_nonfinite=)."""
    return elastic(tmp_path, resources.Static(4),
                   switching=SwitchPolicy(check_every=5, measure=prefer_more_devices),
                   **options)


def train(trainer, state, first, last, batches=BATCHES):
    """Steps first+1 .. last on batches[first:last]; the losses (device scalars)."""
    losses = []
    for i in range(first, last):
        state, metrics = trainer.step(state, batches[i])
        losses.append(metrics["loss"])
    return state, losses


def expected_losses(first, last):
    return fixed_mesh_run(REFERENCE_STEPS)[0][first:last]


def resume_and_compare(tmp_path, saved, steps=4):
    """A new trainer resumes at step `saved` and trains on with the uninterrupted losses."""
    trainer = four_devices(tmp_path)
    state = trainer.init(BATCHES[0])
    assert events(trainer, "resume")[0]["checkpoint_step"] == saved
    assert int(state.step) == saved
    state, losses = train(trainer, state, saved, saved + steps)
    np.testing.assert_allclose(losses, expected_losses(saved, saved + steps), rtol=1e-5)
    return trainer


def kept_steps_are_finite(tmp_path, trainer):
    """Every step kept in tmp_path/"run"/"state" restores (checksums verified) and holds
    only finite values; returns the kept steps."""
    with Checkpointer(tmp_path / "run" / "state", trainer.trainer) as checkpointer:
        steps = checkpointer.all_steps(committed=True)
        for step in steps:
            state = checkpointer.restore(trainer.shape, step=step, devices=trainer.devices)
            for leaf in jax.tree.leaves(jax.device_get(state)):
                assert np.isfinite(leaf).all(), f"step {step} holds nan or inf"
    return steps


PREAMBLE = """\
import os, pathlib, signal, sys, time
# A script run from a terminal: Ctrl-C raises KeyboardInterrupt. (A pytest worker that
# started Ray ignores SIGINT, and a child would inherit that; meshscale keeps an ignored
# signal ignored.)
signal.signal(signal.SIGINT, signal.default_int_handler)
sys.path.insert(0, {root!r})
assert "--xla_force_host_platform_device_count=8" in os.environ["XLA_FLAGS"]
from meshscale import CheckpointPolicy, MetricsPolicy, SwitchPolicy
from meshscale.elastic import resources
from meshscale.errors import CheckpointWriteError
from tests import test_elastic as t
from tests.helpers import prefer_more_devices

tmp = pathlib.Path({tmp!r})


def four_devices(**options):
    # metrics beside the run directory: TensorBoard holds its event file open, and a
    # tmpfs with a file open for writing refuses `remount,ro` (a kernel remount after an
    # I/O error does not ask)
    return t.elastic(tmp, resources.Static(4),
                     switching=SwitchPolicy(check_every=5, measure=prefer_more_devices),
                     metrics=MetricsPolicy(directory=str(tmp / "metrics")), **options)


def wait_for(name, seconds=120):
    deadline = time.time() + seconds
    while not (tmp / name).exists():
        assert time.time() < deadline, f"the test never wrote {{name}}"
        time.sleep(0.05)
"""


@contextlib.contextmanager
def child(tmp_path, body, name="child"):
    """Run `body` (after PREAMBLE) in a Python child with 8 CPU devices and the test
    process's XLA flags; stdout and stderr go to tmp_path/<name>.out / .err. Killed and
    waited for on the way out."""
    script = tmp_path / f"{name}.py"
    script.write_text(PREAMBLE.format(root=str(ROOT), tmp=str(tmp_path))
                      + textwrap.dedent(body))
    env = {**os.environ, "JAX_PLATFORMS": "cpu",  # XLA_FLAGS: conftest's 8 devices
           # the children compile the same few programs: one cache for them all
           "JAX_COMPILATION_CACHE_DIR": str(tmp_path.parent / "children_jax_cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    with open(tmp_path / f"{name}.out", "w") as out, open(tmp_path / f"{name}.err", "w") as err:
        process = subprocess.Popen([sys.executable, str(script)], cwd=ROOT, env=env,
                                   stdout=out, stderr=err)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)


def output(tmp_path, name="child"):
    return ((tmp_path / f"{name}.out").read_text(), (tmp_path / f"{name}.err").read_text())


def wait_until(tmp_path, process, done, what, seconds=CHILD_START, name="child"):
    """Poll `done()` while the child lives; fail with its stderr's tail when it does not."""
    deadline = time.time() + seconds
    while not done():
        if process.poll() is not None:
            pytest.fail(f"the child ended ({process.returncode}) before {what}:\n"
                        + output(tmp_path, name)[1][-3000:])
        if time.time() > deadline:
            pytest.fail(f"the child never reached {what} within {seconds} s:\n"
                        + output(tmp_path, name)[1][-3000:])
        time.sleep(0.05)


def finish(process, seconds):
    """The child's exit status, waiting at most `seconds` (then it is a test failure)."""
    try:
        return process.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the child did not exit within {seconds} s")


# -- exit without close -----------------------------------------------------------------
def test_exit_without_close_keeps_the_last_step(tmp_path):
    """10 steps, a checkpoint every 5, the script returns without close(): the exit hook
    saves step 10 quietly, and a new trainer resumes there exactly."""
    body = """
        trainer = four_devices(checkpoints=CheckpointPolicy(every=5))
        state = trainer.init(t.BATCHES[0])
        for i in range(10):
            state, _ = trainer.step(state, t.BATCHES[i])
    """
    with child(tmp_path, body) as process:
        status = finish(process, CHILD_START)
    stderr = output(tmp_path)[1]
    assert status == 0, stderr[-3000:]
    assert "Traceback" not in stderr and "cannot schedule new futures" not in stderr, stderr
    assert "meshscale: at exit" not in stderr, stderr
    resume_and_compare(tmp_path, saved=10)


# -- SIGTERM and SIGINT ---------------------------------------------------------------
SLOW_LOOP = """
    trainer = four_devices(checkpoints=CheckpointPolicy(every=100))
    state = trainer.init(t.BATCHES[0])
    for i in range(1000):
        state, _ = trainer.step(state, t.BATCHES[i % 30])
        if i + 1 == 3:
            (tmp / "stepped").write_text("3")
        time.sleep({pause})
"""


def saved_step(stderr, signal_name):
    found = re.search(rf"meshscale: stopped by {signal_name} after step (\d+); step (\d+) is "
                      r"saved in (\S+): run the same job again", stderr)
    assert found, stderr[-3000:]
    after, saved, directory = found.groups()
    assert after == saved
    return int(saved), directory


@pytest.mark.parametrize("number", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_mid_run_saves_the_next_step_and_exits_with_128_plus_signal(tmp_path,
                                                                             number):
    name = signal.Signals(number).name
    with child(tmp_path, SLOW_LOOP.format(pause=0.2)) as process:
        wait_until(tmp_path, process, (tmp_path / "stepped").exists, "step 3")
        process.send_signal(number)
        status = finish(process, 60)
    stderr = output(tmp_path)[1]
    assert status == 128 + number, stderr[-3000:]
    assert f"meshscale: {name} received: saving at the next step boundary" in stderr
    assert "Traceback" not in stderr, stderr[-3000:]
    saved, directory = saved_step(stderr, name)
    assert directory == str(tmp_path / "run" / "state")
    assert 3 <= saved <= REFERENCE_STEPS - 4, "the signal came too late for the comparison"
    assert (tmp_path / "run" / "state" / str(saved) / "commit_success.txt").is_file()
    resume_and_compare(tmp_path, saved)


def test_a_second_ctrl_c_stops_at_once(tmp_path):
    """The first SIGINT is recorded (save at the next step boundary); a second one while
    the loop sleeps for a minute raises KeyboardInterrupt there and then."""
    body = SLOW_LOOP.format(pause=0).replace(
        '(tmp / "stepped").write_text("3")',
        '(tmp / "stepped").write_text("3"); time.sleep(120)')
    with child(tmp_path, body) as process:
        wait_until(tmp_path, process, (tmp_path / "stepped").exists, "step 3")
        process.send_signal(signal.SIGINT)
        wait_until(tmp_path, process, lambda: "SIGINT received" in output(tmp_path)[1],
                   "the first SIGINT's line", seconds=30)
        process.send_signal(signal.SIGINT)
        signalled = time.time()
        status = finish(process, 60)
        assert time.time() - signalled < 30, "the second Ctrl-C did not stop at once"
    stderr = output(tmp_path)[1]
    assert status != 0 and "KeyboardInterrupt" in stderr, (status, stderr[-3000:])
    assert "stopped by SIGINT" not in stderr, stderr[-3000:]
    # the exit hook still saved the last trained step
    assert (tmp_path / "run" / "state" / "3" / "commit_success.txt").is_file()


def test_a_signal_the_process_ignores_stays_ignored():
    """A job started with SIGINT ignored (``cmd &`` in a script) keeps ignoring it; SIGTERM
    still saves at the next step."""
    from meshscale.elastic.interrupts import Interrupts

    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        interrupts = Interrupts()
        interrupts.install()
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) == interrupts._handle
        interrupts.uninstall()
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) != interrupts._handle
    finally:
        signal.signal(signal.SIGINT, before)


# -- non-finite steps ----------------------------------------------------------------------
NAN_STEP = 7  # trained on BATCHES[6] with one nan input value
NAN_BATCHES = list(BATCHES[:20])
NAN_BATCHES[NAN_STEP - 1] = {**BATCHES[NAN_STEP - 1],
                             "x": np.asarray(BATCHES[NAN_STEP - 1]["x"]).copy()}
NAN_BATCHES[NAN_STEP - 1]["x"][5, 3] = np.nan


def nan_run(tmp_path, policy):
    return four_devices(tmp_path, timing=Timing(window=2),
                        checkpoints=CheckpointPolicy(every=4, max_to_keep=2,
                                                     on_nonfinite=policy),
                        skip_nonfinite=policy == "skip_step")


def test_nan_with_stop_raises_and_keeps_only_finite_checkpoints(tmp_path):
    trainer = nan_run(tmp_path, "stop")
    state = trainer.init(BATCHES[0])
    with pytest.raises(NonFiniteStep, match=f"step {NAN_STEP} had a non-finite") as raised:
        train(trainer, state, 0, 20, NAN_BATCHES)
    assert (raised.value.step, raised.value.checkpoint_step) == (NAN_STEP, 4)
    trainer.close()  # saves nothing: the last step is not finite
    assert kept_steps_are_finite(tmp_path, trainer) == [4]


def test_nan_with_skip_step_leaves_the_parameters_as_they_were(tmp_path):
    trainer = nan_run(tmp_path, "skip_step")
    state = trainer.init(BATCHES[0])
    state, _ = train(trainer, state, 0, NAN_STEP - 1, NAN_BATCHES)
    before = jax.device_get((state.params, state.opt_state))
    state, _ = train(trainer, state, NAN_STEP - 1, NAN_STEP, NAN_BATCHES)
    after = jax.device_get((state.params, state.opt_state))
    jax.tree.map(np.testing.assert_array_equal, after, before)
    state, losses = train(trainer, state, NAN_STEP, 20, NAN_BATCHES)
    assert int(state.step) == 20 and np.isfinite(jax.device_get(losses)).all()
    skipped = events(trainer, "nonfinite")
    assert [(e["steps"], e["action"]) for e in skipped] == [([NAN_STEP], "skipped")]
    trainer.close()
    assert kept_steps_are_finite(tmp_path, trainer) == [16, 20]


def test_nan_with_rewind_goes_on_from_the_newest_checkpoint(tmp_path):
    trainer = nan_run(tmp_path, "rewind")
    state = trainer.init(BATCHES[0])
    steps = []
    for i in range(20):
        state, metrics = trainer.step(state, NAN_BATCHES[i])
        steps.append(metrics["step"])
    rewinds = events(trainer, "rewind")
    assert [(e["nonfinite_step"], e["checkpoint_step"]) for e in rewinds] == [(NAN_STEP, 4)]
    # The window ending at step 8 finds step 7; step 8 is never saved, training goes on
    # from step 4 with the next batches.
    assert steps[:8] == list(range(1, 8)) + [4] and steps[-1] == 16
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(jax.device_get(state)))
    trainer.close()
    kept = kept_steps_are_finite(tmp_path, trainer)
    assert kept == [12, 16]


# -- a failed save --------------------------------------------------------------------
def test_a_directory_made_read_only_mid_run_fails_the_next_step_and_the_process_exits(
        tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(run)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    body = """
        trainer = four_devices(checkpoints=CheckpointPolicy(every=2))
        state = trainer.init(t.BATCHES[0])
        for i in range(4):
            state, _ = trainer.step(state, t.BATCHES[i])
        trainer.checkpointer.wait()  # step 4 is on disk
        (tmp / "stepped").write_text("4")
        wait_for("read-only")
        try:
            for i in range(4, 30):
                state, _ = trainer.step(state, t.BATCHES[i])
                time.sleep(0.1)
        except CheckpointWriteError as e:
            print(f"CheckpointWriteError at step {i + 1}: {e}", flush=True)
            sys.exit(3)
        print("no error", flush=True)
    """
    try:
        with child(tmp_path, body) as process:
            wait_until(tmp_path, process, (tmp_path / "stepped").exists, "step 4")
            subprocess.run(["mount", "-o", "remount,ro", str(run)], check=True)
            (tmp_path / "read-only").write_text("")
            status = finish(process, 60)
        stdout, stderr = output(tmp_path)
        assert status == 3, (stdout, stderr[-3000:])
        message = stdout.strip().splitlines()[-1]
        assert str(run / "state") in message and "Read-only file system" in message, message
        assert "Traceback" not in stderr, stderr[-3000:]
        # the exit hook tried to save the last step too, and said in one line it could not
        lost = [line for line in stderr.splitlines() if line.startswith("meshscale: at exit")]
        assert len(lost) == 1 and "was not written" in lost[0], stderr[-3000:]
        assert (run / "state" / "4" / "commit_success.txt").is_file()
    finally:
        subprocess.run(["umount", "-l", str(run)], capture_output=True)


# -- one writer per run directory --------------------------------------------------------
def test_a_second_job_on_a_live_jobs_directory_is_refused_then_takes_over_a_dead_ones(
        tmp_path):
    body = """
        trainer = four_devices(checkpoints=CheckpointPolicy(every=2))
        state = trainer.init(t.BATCHES[0])
        for i in range(4):
            state, _ = trainer.step(state, t.BATCHES[i])
        trainer.checkpointer.wait()
        (tmp / "holding").write_text(str(os.getpid()))
        time.sleep(600)
    """
    with child(tmp_path, body) as process:
        wait_until(tmp_path, process, (tmp_path / "holding").exists, "its lock")
        with pytest.raises(RunDirectoryLocked, match=rf"in use by pid {process.pid} on host"):
            four_devices(tmp_path)
        lock = json.loads((tmp_path / "run" / ".meshscale.lock").read_text())
        assert lock["pid"] == process.pid
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    trainer = resume_and_compare(tmp_path, saved=4)
    assert json.loads((tmp_path / "run" / ".meshscale.lock").read_text())["pid"] == os.getpid()
    trainer.close()


# -- flipped bytes -------------------------------------------------------------------------
def test_a_flipped_byte_in_the_newest_step_restores_the_previous_step(tmp_path, caplog):
    trainer = four_devices(tmp_path, checkpoints=CheckpointPolicy(every=4))
    state = trainer.init(BATCHES[0])
    train(trainer, state, 0, 8)
    trainer.close()
    step_dir = tmp_path / "run" / "state" / "8"
    files = [f for f in (step_dir / "state").rglob("*") if f.is_file()]
    largest = max(files, key=lambda f: f.stat().st_size)
    data = bytearray(largest.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
    largest.write_bytes(bytes(data))
    before = sorted(str(p.relative_to(step_dir)) for p in step_dir.rglob("*"))
    with caplog.at_level("WARNING"):
        resumed = four_devices(tmp_path, checkpoints=CheckpointPolicy(every=4))
        state = resumed.init(BATCHES[0])
    assert events(resumed, "resume")[0]["checkpoint_step"] == 4 and int(state.step) == 4
    assert resumed.checkpointer.last_fallback.skipped[0][0] == 8
    assert re.search(r"step 8 .* is unreadable \(checksum mismatch in ", caplog.text), \
        caplog.text
    assert sorted(str(p.relative_to(step_dir)) for p in step_dir.rglob("*")) == before
    state, losses = train(resumed, state, 4, 8)
    np.testing.assert_allclose(losses, expected_losses(4, 8), rtol=1e-5)
    resumed.close()  # saving step 8 again first moves the damaged one aside, intact
    assert sorted(str(p.relative_to(step_dir.parent / "8.damaged"))
                  for p in (step_dir.parent / "8.damaged").rglob("*")) == before


# -- wrong batches ----------------------------------------------------------------------------
def wrong_batches():
    good = jax.device_get(BATCHES[0])
    x, y = good["x"], good["y"]
    return {
        "rows": ({"x": np.concatenate([x, x[:1]]), "y": np.concatenate([y, y[:1]])},
                 r"\['x'\].*global_batch=24"),
        "dtype": ({"x": x.astype(np.int32), "y": y}, r"\['x'\] is int32.*float32"),
        "missing key": ({"x": x}, r"'y'"),
        "extra key": ({**good, "z": x}, r"'z'"),
    }


def test_a_wrong_batch_is_refused_in_one_line_and_the_state_survives(tmp_path):
    trainer = four_devices(tmp_path, checkpoints=CheckpointPolicy(every=None))
    state = trainer.init(BATCHES[0])
    state, losses = train(trainer, state, 0, 2)
    for what, (batch, pattern) in wrong_batches().items():
        with pytest.raises(InvalidBatch, match=pattern) as raised:
            trainer.step(state, batch)
        assert "\n" not in str(raised.value), what
    state, more = train(trainer, state, 2, 4)  # the state passed in was not consumed
    np.testing.assert_allclose(losses + more, expected_losses(0, 4), rtol=1e-5)
    assert int(state.step) == 4
