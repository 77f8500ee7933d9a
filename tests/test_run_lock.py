"""One writer per run directory: `RunLock` refuses a live holder, takes over a stale one
(dead pid on this host, or no heartbeat for a lease), and removes only its own file.

Tests that need a live holder start a child process that takes the lock and sleeps; each
is bounded by timeouts and kills and reaps its child whatever happens.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from meshscale.errors import RunDirectoryLocked
from meshscale.store.run_lock import LOCK_NAME, RunLock

ROOT = str(pathlib.Path(__file__).resolve().parents[1])
START_TIMEOUT = 60  # seconds for a child to import meshscale and take the lock
HOLDER = textwrap.dedent("""
    import pathlib, sys, time
    from meshscale.store.run_lock import RunLock
    RunLock(sys.argv[1], lease_seconds=600).acquire()
    pathlib.Path(sys.argv[2]).write_text("held")
    time.sleep(120)
""")


@pytest.fixture
def child_holder(tmp_path):
    """A child process holding the lock on tmp_path/run (yields the process and the dir)."""
    run, marker = tmp_path / "run", tmp_path / "held"
    child = subprocess.Popen([sys.executable, "-c", HOLDER, str(run), str(marker)], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not marker.exists():
            if child.poll() is not None:
                pytest.fail(f"the holder exited early:\n{child.stdout.read().decode()}")
            if time.monotonic() > deadline:
                pytest.fail(f"the holder did not take the lock within {START_TIMEOUT} s")
            time.sleep(0.05)
        yield child, run
    finally:
        child.kill()
        child.wait(timeout=10)
        child.stdout.close()


def write_lock(run, *, host, pid, token, lease_seconds, age):
    """A lock file written by hand, its mtime `age` seconds in the past."""
    run.mkdir(parents=True, exist_ok=True)
    path = run / LOCK_NAME
    path.write_text(json.dumps({"host": host, "pid": pid, "since": "2026-01-01T00:00:00Z",
                                "lease_seconds": lease_seconds, "token": token}))
    past = time.time() - age
    os.utime(path, (past, past))
    return path


def heartbeat_threads(lock):
    """`lock`'s heartbeat thread, if running (other tests' trainers in this process may
    hold locks of their own)."""
    name = f"meshscale-run-lock-{lock.holder()['token'][:8]}" if lock.holder() else None
    return [t for t in threading.enumerate() if t.name == name]


def test_lock_held_by_a_live_process_is_refused_naming_its_pid_and_host(child_holder):
    child, run = child_holder
    with pytest.raises(RunDirectoryLocked) as refused:
        RunLock(run).acquire()
    message = str(refused.value)
    assert f"pid {child.pid} on host {socket.gethostname()}" in message
    assert "\n" not in message and "use another checkpoint_dir" in message
    assert RunLock(run).holder()["pid"] == child.pid  # the refusal left the lock alone
    assert not list(run.glob(f"{LOCK_NAME}.stale-*"))


def test_lock_of_a_killed_process_on_this_host_is_taken_over_at_once(child_holder, caplog):
    child, run = child_holder
    child.kill()
    child.wait(timeout=10)  # reaped: its pid is gone, though its lock's mtime is fresh
    lock = RunLock(run, lease_seconds=600)
    started = time.monotonic()
    with caplog.at_level("WARNING", logger="meshscale.store.run_lock"):
        lock.acquire()
    try:
        assert time.monotonic() - started < 5
        assert len(list(run.glob(f"{LOCK_NAME}.stale-*"))) == 1
        assert (lock.holder()["pid"], lock.holder()["host"]) == (os.getpid(),
                                                                 socket.gethostname())
        assert f"pid {child.pid} is gone" in caplog.text
    finally:
        lock.release()


def test_lock_from_another_host_is_taken_over_only_after_its_lease(tmp_path):
    old = tmp_path / "old"
    write_lock(old, host="elsewhere", pid=1, token="theirs", lease_seconds=5, age=60)
    with RunLock(old) as lock:
        assert lock.holder()["pid"] == os.getpid()
        assert json.loads((old / f"{LOCK_NAME}.stale-theirs").read_text())["token"] == "theirs"

    fresh = tmp_path / "fresh"
    path = write_lock(fresh, host="elsewhere", pid=1, token="theirs", lease_seconds=5, age=0)
    with pytest.raises(RunDirectoryLocked, match="pid 1 on host elsewhere"):
        RunLock(fresh).acquire()
    assert json.loads(path.read_text())["token"] == "theirs"
    assert not list(fresh.glob(f"{LOCK_NAME}.stale-*"))


def test_heartbeat_refreshes_mtime_and_release_stops_it_and_removes_only_our_file(tmp_path):
    run = tmp_path / "run"
    lock = RunLock(run, lease_seconds=1.0, heartbeat_seconds=0.1)
    lock.acquire()
    try:
        path = pathlib.Path(lock.path)
        past = time.time() - 30
        os.utime(path, (past, past))
        deadline = time.monotonic() + 5
        while path.stat().st_mtime < past + 20 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert path.stat().st_mtime >= past + 20, "the heartbeat did not refresh the mtime"
        assert [t.daemon for t in heartbeat_threads(lock)] == [True]
        token = lock.holder()["token"]
        (run / "kept.txt").write_text("a run's own file")
    finally:
        lock.release()
    assert not [t for t in threading.enumerate() if t.name.endswith(token[:8])]
    assert [p.name for p in run.iterdir()] == ["kept.txt"]
    lock.release()  # idempotent

    slow = RunLock(run, lease_seconds=600)  # heartbeat every 150 s: release must not wait
    slow.acquire()
    token = slow.holder()["token"]
    started = time.monotonic()
    slow.release()
    assert time.monotonic() - started < 1
    assert not [t for t in threading.enumerate() if t.name.endswith(token[:8])]


def test_release_leaves_a_lock_that_another_token_holds(tmp_path):
    run = tmp_path / "run"
    lock = RunLock(run)
    lock.acquire()
    path = write_lock(run, host="elsewhere", pid=1, token="theirs", lease_seconds=60, age=0)
    lock.release()
    assert json.loads(path.read_text())["token"] == "theirs"


def test_same_process_shares_its_own_lock_and_the_last_release_removes_it(tmp_path):
    run = tmp_path / "run"
    first = RunLock(run)
    first.acquire()
    second = RunLock(run)
    try:
        second.acquire()  # a notebook re-creating a trainer: shared, no file churn
        token = second.holder()["token"]
        assert sorted(p.name for p in run.iterdir()) == [LOCK_NAME]
        first.release()  # the old trainer goes: the new one keeps the lock
        assert second.holder()["token"] == token
        assert (run / LOCK_NAME).exists()
    finally:
        second.release()
    assert not (run / LOCK_NAME).exists()
    other = RunLock(run)  # and it can be taken again afterwards
    other.acquire()
    other.release()
