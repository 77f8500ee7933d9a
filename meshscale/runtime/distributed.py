"""Several JAX processes, one job: start-up, and the few facts they must agree on.

JAX's multi-controller runtime runs the collectives and Orbax writes the checkpoints;
this module only starts the runtime (`initialize`) and keeps the processes in step:
`broadcast` sends process 0's value to every process (one decision, one device list),
`slowest` reduces timings so the slowest process counts, `failed_anywhere` makes a
failure on one process a failure on all (in the failing process's words). Each is a
collective: every process must call it in the same order. With one process each is a
no-op returning its argument.

Never: let processes pick different meshes, or build a runtime of its own.
"""

from __future__ import annotations

import logging
import os
import pickle
import sys
from collections.abc import Sequence
from typing import Any, TypeVar

import jax
import numpy as np
from jax.experimental import multihost_utils

from meshscale.runtime.launch import ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID

log = logging.getLogger(__name__)

T = TypeVar("T")


def initialize(**kwargs) -> None:
    """Join the job's other processes (before any JAX computation).

    Under ``meshscale launch`` (its environment variables are set) this connects to the
    launcher's loopback coordinator with gloo CPU collectives. Otherwise it calls plain
    `jax.distributed.initialize(**kwargs)`, which finds the coordinator, process count
    and index itself on Cloud TPU, SLURM, Open MPI and Kubernetes (or from ``kwargs``).
    A second call does nothing. Under the launcher an uncaught exception ends the process
    at once (exit status 1) instead of waiting for its peers at JAX's shutdown barrier.
    """
    if jax.distributed.is_initialized():
        return
    if os.environ.get(ENV_COORDINATOR):
        kwargs = {"coordinator_address": os.environ[ENV_COORDINATOR],
                  "num_processes": int(os.environ[ENV_NUM_PROCESSES]),
                  "process_id": int(os.environ[ENV_PROCESS_ID]), **kwargs}
    if os.environ.get(ENV_COORDINATOR) or os.environ.get("JAX_PLATFORMS") == "cpu":
        # CPU devices of several processes talk through gloo (the default has no
        # cross-process collectives); must be set before the CPU backend starts.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)
    if os.environ.get(ENV_COORDINATOR):
        sys.excepthook = _exit_at_once(sys.excepthook)
    if not is_main():  # logs come from process 0; warnings from everyone
        logging.getLogger("meshscale").setLevel(logging.WARNING)
    log.info("process %d of %d: %d local devices, %d in all", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())


def _exit_at_once(hook):
    """An excepthook that ends the process right after printing the error.

    A normal exit waits at JAX's shutdown barrier for peers that may be stuck in a
    collective with this process; exiting at once lets the launcher see the failure and
    stop the others.
    """

    def excepthook(*exc_info):
        hook(*exc_info)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)

    return excepthook


def is_main() -> bool:
    """Whether this is process 0, the one that logs, prints and writes reports."""
    return jax.process_index() == 0


def broadcast(value: T, *, source: int = 0) -> T:
    """Process `source`'s `value` (any picklable object), on every process."""
    if jax.process_count() == 1:
        return value
    mine = jax.process_index() == source
    data = np.frombuffer(pickle.dumps(value), np.uint8) if mine else np.zeros(0, np.uint8)
    size = int(multihost_utils.broadcast_one_to_all(np.array(data.size, np.int64),
                                                    is_source=mine))
    padded = np.zeros(max(256, 1 << (size - 1).bit_length()), np.uint8)  # few shapes: few
    padded[: data.size] = data                                            # compiles
    received = multihost_utils.broadcast_one_to_all(padded, is_source=mine)
    return pickle.loads(np.asarray(received, np.uint8)[:size].tobytes())


def slowest(seconds: Any) -> np.ndarray:
    """Element-wise maximum of `seconds` (same shape on every process) across processes.

    NaN anywhere (a process whose measurement failed) makes that element NaN.
    """
    values = np.asarray(seconds, np.float64)
    if jax.process_count() == 1:
        return values
    return np.max(multihost_utils.process_allgather(values), axis=0)


def failed_anywhere(failure: str | None) -> str | None:
    """The first failing process's `failure` (a status text; None where a process
    succeeded), the same text on every process, or None when every process succeeded.

    Use it on any local outcome that decides whether a process enters a collective next
    (a try-run's compile or placement, a checkpoint step's readability): failure anywhere
    is failure everywhere, so no process waits in a collective its peers skipped.
    """
    if jax.process_count() == 1:
        return failure
    flags = np.asarray(multihost_utils.process_allgather(np.array(failure is not None)))
    if not flags.any():
        return None
    first = int(np.argmax(flags))
    return f"{broadcast(failure, source=first)} (on process {first})"


def idle_processes(devices: Sequence[jax.Device]) -> list[int]:
    """Processes that own none of `devices` (a mesh there leaves them nothing to run)."""
    used = {d.process_index for d in devices}
    return [p for p in range(jax.process_count()) if p not in used]


def can_place() -> bool:
    """Whether state may move between meshes in memory (`jax.device_put`): one process.

    Across processes JAX moves arrays only within one device set (CPU has no cross-host
    transfers), and a move is then a collective computation per array, run
    asynchronously: on CPU, two in flight at once can deadlock the gloo collectives
    (seen in the multi-process tests). So with several processes the state moves
    through a checkpoint, and a try-run trains a fresh state of the same shapes.
    """
    return jax.process_count() == 1


def agree_devices(devices: Sequence[jax.Device]) -> list[jax.Device]:
    """Process 0's device list, as this process's `jax.Device` objects."""
    if jax.process_count() == 1:
        return list(devices)
    by_id = {int(d.id): d for d in jax.devices()}
    return [by_id[i] for i in broadcast([int(d.id) for d in devices])]
