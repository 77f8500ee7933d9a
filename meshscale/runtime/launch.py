"""A local multi-process launcher: N JAX processes on one machine, for trying multi-host.

`launch` starts ``python COMMAND...`` N times with the environment that
`meshscale.runtime.distributed.initialize` reads (coordinator on a free loopback port, process
count and index) and `meshscale.runtime.simulated.cpu_env`'s simulated CPU devices
per process. It streams every child's output prefixed with ``[pK]``, and ends them all
as soon as one fails or on timeout. SIGTERM or Ctrl-C to the launcher is passed on to
every child as SIGTERM, as a cluster's preemption notice reaches every host: JAX's
preemption service lets them save at one step (`meshscale.elastic.interrupts`); they get
`SAVE_GRACE` seconds before SIGKILL, and a second Ctrl-C kills them at once. On a real
cluster there is no launcher: the scheduler starts one process per host and
`jax.distributed.initialize()` finds its peers on its own.

Never imports jax: the children must start their JAX backends with their own flags.
"""

from __future__ import annotations

import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence

from meshscale.runtime.simulated import cpu_env

ENV_COORDINATOR = "MESHSCALE_COORDINATOR"
ENV_NUM_PROCESSES = "MESHSCALE_NUM_PROCESSES"
ENV_PROCESS_ID = "MESHSCALE_PROCESS_ID"
TIMED_OUT = 124  # exit status on timeout, as coreutils' timeout(1)
INTERRUPTED = 130
SAVE_GRACE = 60.0  # seconds the children get to save and exit after a forwarded SIGTERM


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(process_id: int, num_processes: int, coordinator: str,
              devices_per_process: int, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of child `process_id`: launcher variables, CPU platform, devices."""
    env = dict(os.environ if base is None else base)
    env.update({
        ENV_COORDINATOR: coordinator, ENV_NUM_PROCESSES: str(num_processes),
        ENV_PROCESS_ID: str(process_id), "PYTHONUNBUFFERED": "1",
        **cpu_env(devices_per_process, env)})
    return env


def _stop(children: Sequence[subprocess.Popen], grace: float = 5.0) -> None:
    """SIGTERM each running child's process group, then SIGKILL what is left after
    `grace` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = [c for c in children if c.poll() is None]
        for child in alive:
            try:
                os.killpg(child.pid, sig)  # its own group (start_new_session): it and its own
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        for child in alive:
            try:
                child.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
    for child in children:
        if child.poll() is None:
            child.wait()


def _check(command: Sequence[str], processes: int, devices_per_process: int) -> None:
    if processes < 1 or devices_per_process < 1:
        raise ValueError(f"need processes >= 1 and devices_per_process >= 1, got "
                         f"{processes} and {devices_per_process}")
    if not command:
        raise ValueError("nothing to launch: pass a script (and its arguments)")


def _relay(selector: selectors.BaseSelector, wait: float, children: list[subprocess.Popen],
           partial: dict[int, bytes], write: Callable[[str], None], *,
           stop_on_failure: bool) -> int:
    """Pass on the lines the children printed within `wait` seconds, prefixed ``[pK]``;
    the exit status of a child that ended with one (0 when none did, or after a signal,
    when each stops on its own)."""
    status = 0
    for key, _ in selector.select(timeout=wait):
        pid = key.data
        chunk = os.read(key.fd, 1 << 16)
        *lines, partial[pid] = (partial[pid] + chunk).split(b"\n")
        if not chunk:  # end of its output: all of it was read, see how it ended
            lines, partial[pid] = [*lines, partial[pid]] if partial[pid] else lines, b""
        for line in lines:
            write(f"[p{pid}] {line.decode(errors='replace').rstrip()}")
        if chunk:
            continue
        selector.unregister(key.fileobj)
        try:
            code = children[pid].wait(timeout=10)
        except subprocess.TimeoutExpired:  # closed its output, still running
            continue
        if code != 0 and stop_on_failure and status == 0:
            write(f"[launch] process {pid} exited with {code}: stopping the others")
            status = code
    return status


def launch(command: Sequence[str], *, processes: int, devices_per_process: int,
           timeout: float | None = None, port: int | None = None,
           output: Callable[[str], None] | None = None, cwd: str | None = None,
           env: dict[str, str] | None = None) -> int:
    """Run ``python *command`` as `processes` JAX processes on this machine.

    Args:
      command: what follows the Python executable: ``["train.py", "--steps", "10"]`` or
        ``["-m", "pkg.mod"]``.
      processes: how many processes (process ids 0 .. processes - 1).
      devices_per_process: simulated CPU devices each process gets.
      timeout: seconds before every child is stopped (exit status 124); None: no limit.
      port: the coordinator's loopback port (default: a free one).
      output: called with every line the children print, prefixed ``[pK] `` (default:
        written to stdout).
      cwd, env: the children's working directory; extra environment variables for all.

    Returns:
      0 when every child exited with 0; otherwise the first non-zero exit status seen (the
      other children are stopped then), 124 on timeout, 130 on Ctrl-C.
    """
    _check(command, processes, devices_per_process)
    write = output or (lambda line: print(line, flush=True))
    coordinator = f"127.0.0.1:{port or free_port()}"
    children: list[subprocess.Popen] = []
    selector = selectors.DefaultSelector()
    partial: dict[int, bytes] = {}
    status = 0
    signalled: list[int] = []

    def forward(number, frame):  # a notice for the whole job: every child saves
        signalled.append(number)
        if len(signalled) > 1 and number == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        for child in children:
            if child.poll() is None:
                os.kill(child.pid, signal.SIGTERM)
        write(f"[launch] {signal.Signals(number).name}: every process saves and stops "
              f"(up to {SAVE_GRACE:g} s)")

    previous = {n: signal.signal(n, forward) for n in (signal.SIGTERM, signal.SIGINT)} \
        if threading.current_thread() is threading.main_thread() else {}
    try:
        for pid in range(processes):
            children.append(subprocess.Popen(
                [sys.executable, *command], cwd=cwd, stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                env=child_env(pid, processes, coordinator, devices_per_process,
                              {**os.environ, **(env or {})})))
            selector.register(children[-1].stdout, selectors.EVENT_READ, pid)
            partial[pid] = b""
        deadline = None if timeout is None else time.monotonic() + timeout
        while selector.get_map() and status == 0:
            left = None if deadline is None else deadline - time.monotonic()
            if signalled and (deadline is None or left > SAVE_GRACE):
                deadline, left = time.monotonic() + SAVE_GRACE, SAVE_GRACE
            if left is not None and left <= 0:
                write(f"[launch] timed out after {timeout:g} s: stopping {processes} processes"
                      if not signalled else f"[launch] still running {SAVE_GRACE:g} s after "
                      "the signal: killing every process")
                status = TIMED_OUT
                break
            status = _relay(selector, min(1.0, left) if left is not None else 1.0, children,
                            partial, write, stop_on_failure=not signalled)
    except KeyboardInterrupt:
        write("[launch] interrupted: stopping every process")
        status = INTERRUPTED
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        _stop(children)
        selector.close()
        for child in children:
            child.stdout.close()
    if status == 0:
        status = next((c.returncode for c in children if c.returncode != 0), 0)
    return status
