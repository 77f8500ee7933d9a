"""One writer per run directory: a lock file with a lease, kept fresh by a heartbeat.

`RunLock(dir)` holds ``dir/.meshscale.lock`` (JSON: host, pid, since, lease_seconds, token),
made with ``O_CREAT | O_EXCL`` (atomic on local disks and NFS); a daemon thread refreshes
its mtime every ``heartbeat_seconds``. Another job's lock is refused (`RunDirectoryLocked`)
unless stale: its pid is gone (same host) or its heartbeat stopped for a lease (any host).
A stale lock is renamed aside (``.stale-<token>``), then ours made with ``O_EXCL``: of two
takers one wins. Re-entrant: RunLocks of one process on one directory (a notebook
building a new trainer) share the file; the last release removes it. Multi-process:
process 0 alone touches the file; all raise or none. URLs (``gs://``), best-effort: no
``O_EXCL`` on object stores, so two jobs checking at one moment may both write (the
later wins); the heartbeat rewrites the file.

Never: take a lock a live job holds; delete any file but our own lock (stale ones are
renamed aside; `release` removes it only while it holds our token); keep the process alive.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import socket
import threading
import time
import uuid

import jax

from meshscale.errors import RunDirectoryLocked
from meshscale.runtime.distributed import failed_anywhere
from meshscale.runtime.paths import run_path

log = logging.getLogger(__name__)

LOCK_NAME = ".meshscale.lock"


class RunLock:
    """The lock on one run directory: `acquire`/`release`, or ``with RunLock(dir):``."""

    def __init__(self, directory: str | os.PathLike, *, lease_seconds: float = 60.0,
                 heartbeat_seconds: float | None = None):
        self.directory = str(run_path(directory))
        self.lease_seconds = float(lease_seconds)
        self.heartbeat_seconds = float(heartbeat_seconds or self.lease_seconds / 4)
        self.path = f"{self.directory.rstrip('/')}/{LOCK_NAME}"
        self._url = "://" in self.directory
        self._token, self._stop, self._thread = None, threading.Event(), None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()

    def holder(self) -> dict | None:
        """What the lock file says (None when there is none or it cannot be parsed)."""
        with contextlib.suppress(OSError, ValueError):
            return json.loads(self._read(self.path)[0])
        return None

    def acquire(self) -> None:
        """Take the lock (a stale one with a WARNING), or raise `RunDirectoryLocked`
        naming the live holder, on every process (process 0's other errors, elsewhere)."""
        if self._token is not None:
            return
        owner = _OWNERS.get(self.path)
        if owner is not None:  # this process holds it already (another trainer): share it
            _REFS[self.path] += 1
            self._token = owner._file_token
            return
        problem, error = None, None
        if jax.process_index() == 0:
            try:
                self._take()
            except Exception as caught:  # told to every process before anyone raises
                problem, error = str(caught) or repr(caught), caught
        agreed = failed_anywhere(problem)  # one process: no collective
        if error is not None:
            raise error
        if agreed is not None:
            raise RunDirectoryLocked(agreed)

    def release(self) -> None:
        """Stop the heartbeat; remove the lock file if it holds our token. Idempotent."""
        token, self._token = self._token, None
        if token is None:
            return
        _REFS[self.path] -= 1
        if _REFS[self.path] > 0:  # another RunLock of this process still holds it
            return
        del _REFS[self.path]
        owner = _OWNERS.pop(self.path)  # the object whose heartbeat keeps the file
        owner._stop.set()
        owner._thread.join(timeout=5.0)
        self._release_file(token)

    def _release_file(self, token: str) -> None:
        now = self.holder()
        if (now or {}).get("token") != token:
            log.log(logging.INFO if _this_process(now) else logging.WARNING,
                    "run lock %s is held by %s now: left as it is", self.path, _describe(now))
            return
        try:
            run_path(self.path).unlink() if self._url else os.remove(self.path)
        except FileNotFoundError:
            pass
        except OSError as error:  # a read-only or vanished disk: the job ends regardless
            log.warning("could not remove run lock %s (%s): a later job takes it over "
                        "once this process is gone", self.path, error)

    def _read(self, path: str) -> tuple[str, float]:
        if self._url:
            return run_path(path).read_text(), float(run_path(path).stat().mtime)
        with open(path) as file:
            return file.read(), os.fstat(file.fileno()).st_mtime

    def _create(self, text: str) -> bool:
        if self._url:
            if run_path(self.path).exists():
                return False
            run_path(self.path).write_text(text)
            return True
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as file:  # closing flushes it (NFS: close-to-open)
            file.write(text)
        return True

    def _take(self) -> None:
        (run_path(self.directory).mkdir(parents=True, exist_ok=True) if self._url
         else os.makedirs(self.directory, exist_ok=True))
        token = uuid.uuid4().hex
        since = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        text = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": since,
                           "lease_seconds": self.lease_seconds, "token": token})
        for _ in range(2):  # a second look when another job moved the lock meanwhile
            if self._create(text):
                break
            try:
                old_text, mtime = self._read(self.path)
                old = json.loads(old_text)
            except FileNotFoundError:  # released in between
                continue
            except ValueError:  # half-written or foreign: judged by its age alone
                old = None
            stale = self._stale_reason(old, time.time() - mtime)
            if stale is None:
                self._refuse(old, mtime)
            aside = f"{self.path}.stale-{(old or {}).get('token') or uuid.uuid4().hex}"
            try:
                run_path(self.path).rename(aside) if self._url else os.rename(self.path, aside)
            except FileNotFoundError:  # someone else took it over first
                continue
            if not self._url and self._read(aside)[0] != old_text:  # we moved a newer lock:
                with contextlib.suppress(FileExistsError):  # put it back, never over another
                    os.link(aside, self.path)
                    os.remove(aside)  # a second name of the lock now back at self.path
                continue
            if self._create(text):
                log.log(logging.INFO if stale == "this process" else logging.WARNING,
                        "took over run lock %s from %s (%s); the old lock is at %s",
                        self.path, _describe(old), stale, aside)
                break
        else:
            self._refuse(self.holder(), time.time())
        self._token, self._file_token, self._stop = token, token, threading.Event()
        _OWNERS[self.path], _REFS[self.path] = self, 1
        self._thread = threading.Thread(target=self._beat, args=(self._stop, token, text),
                                        name=f"meshscale-run-lock-{token[:8]}", daemon=True)
        self._thread.start()

    def _stale_reason(self, old: dict | None, age: float) -> str | None:
        """Why the lock `old` (None: unreadable) of `age` seconds is stale, or None."""
        if old and old.get("host") == socket.gethostname() and isinstance(old.get("pid"), int):
            if old["pid"] == os.getpid():
                return "this process"
            try:
                os.kill(old["pid"], 0)
            except ProcessLookupError:
                return f"pid {old['pid']} is gone"
            except PermissionError:
                pass  # alive, another user's
        lease = float((old or {}).get("lease_seconds") or self.lease_seconds)
        return f"no heartbeat for {age:.0f} s, lease {lease:g} s" if age > lease else None

    def _refuse(self, old: dict | None, mtime: float) -> None:
        raise RunDirectoryLocked(
            f"run directory {self.directory} is in use by {_describe(old)} (lock "
            f"{self.path}, heartbeat {max(0.0, time.time() - mtime):.0f} s ago): "
            "stop that job, or use another checkpoint_dir")

    def _beat(self, stop: threading.Event, token: str, text: str) -> None:
        while not stop.wait(self.heartbeat_seconds):
            try:
                now = self.holder()
                if (now or {}).get("token") != token:
                    log.log(logging.INFO if _this_process(now) else logging.ERROR,
                            "run lock %s was taken over by %s: heartbeat stopped",
                            self.path, _describe(now))
                    return
                run_path(self.path).write_text(text) if self._url else os.utime(self.path)
            except OSError as error:
                log.warning("heartbeat of run lock %s failed: %s", self.path, error)


def _describe(record: dict | None) -> str:
    return (f"pid {record.get('pid')} on host {record.get('host')} since {record.get('since')}"
            if record else "an unknown holder (no readable lock file)")


def _this_process(record: dict | None) -> bool:
    return (record or {}).get("pid") == os.getpid() and record["host"] == socket.gethostname()


# The lock files this process holds, by path: the RunLock that made the file (and runs
# its heartbeat) and how many RunLock objects hold it (a notebook re-creating a trainer).
_OWNERS: dict[str, RunLock] = {}
_REFS: dict[str, int] = {}
