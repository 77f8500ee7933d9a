"""meshscale under Ray Train: an `ElasticTrainer` loop as an elastic `JaxTrainer` job.

Past one host, what changes a job's devices is the orchestrator: Ray Train's elastic
`JaxTrainer` (``ScalingConfig(num_workers=(min, max))``) restarts every worker as a new
group when nodes join or leave, or when a worker dies. meshscale needs nothing new for
that: `ElasticTrainer.init` restores the latest checkpoint onto the best mesh for the
devices the new group has. This module is only the glue around the user's loop:

- `join_jax`: makes the workers one JAX job. Ray's JAX backend calls
  `jax.distributed.initialize` itself for GPU and TPU; on CPU it does not, so worker 0
  picks a coordinator port and `ray.train.collective.broadcast_from_rank_zero` shares it.
- `check_shared_storage`: every worker must see `checkpoint_dir` (Orbax writes each
  process's shards there and a restart reads them back), checked before any training.
- `report`: `ray.train.report` with meshscale's metrics (loss, mesh, samples/s, switches).
- `train_function` / `jax_trainer`: a user's ``loop(config)`` as Ray's training function.

The same loop runs as a plain process, under ``meshscale launch``, under SLURM or
Kubernetes through `meshscale.runtime.distributed.initialize`, or here: it only reads
``config["checkpoint_dir"]`` and sizes its `resources` by ``jax.device_count()``.

Never: train before every worker has joined and seen the checkpoint directory, or pick a
mesh by itself (that is `ElasticTrainer.init`'s job on every restart).
"""

from __future__ import annotations

import functools
import logging
import os
import time
import uuid
from collections.abc import Callable
from typing import Any

from meshscale.elastic import events
from meshscale.errors import InsufficientDevices, StorageNotShared
from meshscale.observe import goodput
from meshscale.runtime import distributed

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'meshscale[ray]'"
CHECKPOINT_DIR = "checkpoint_dir"  # the config key the loop reads its directory from
Loop = Callable[[dict], Any]


def require_ray():
    """The `ray.train` module, or an ImportError naming the extra to install."""
    try:
        import ray.train
        from ray.train.v2.jax import JaxTrainer  # noqa: F401  (Train v2, ray >= 2.60)
    except ImportError as e:
        raise ImportError(f"meshscale.integrations.ray needs Ray Train 2.60: {INSTALL_HINT}"
                          f" ({e})") from e
    return ray.train


def join_jax() -> None:
    """Make this Ray Train worker one process of the group's JAX job; call it first.

    Ray's JAX backend has already initialized `jax.distributed` for GPU and TPU groups
    (``use_gpu``/``use_tpu``); then this does nothing. Otherwise (CPU) worker 0 picks a
    free port on its node, broadcasts ``host:port`` to the others, and every worker joins
    with gloo CPU collectives (JAX's CPU default has none across processes). A group of
    one worker stays a plain single-process job.
    """
    import jax

    train = require_ray()
    if jax.distributed.is_initialized():
        return
    context = train.get_context()
    size, rank = context.get_world_size(), context.get_world_rank()
    if size == 1:
        return
    import ray
    from ray.train.collective import broadcast_from_rank_zero

    from meshscale.runtime.launch import free_port

    address = f"{ray.util.get_node_ip_address()}:{free_port()}" if rank == 0 else None
    address = broadcast_from_rank_zero(address)
    # Must precede the CPU backend's start; GPU and TPU backends ignore it.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    distributed.initialize(coordinator_address=address, num_processes=size, process_id=rank)


def check_shared_storage(path: str | os.PathLike) -> None:
    """Raise `StorageNotShared` on every process unless all of them see `path`.

    Process 0 writes a marker file with a fresh name into `path`; every process looks for
    it. A collective: every process of the job calls it after `join_jax`.
    """
    from etils import epath

    directory = epath.Path(path)
    failure = None
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        failure = f"cannot create it ({e})"
    token = distributed.broadcast(uuid.uuid4().hex if distributed.is_main() else None)
    marker = directory / f".meshscale-shared-{token}"
    if distributed.is_main() and failure is None:
        try:
            marker.write_text("written by process 0 to check that every process sees it\n")
        except OSError as e:  # said on every process below, never a hang of the others
            failure = f"process 0 cannot write to it ({e})"
    # the broadcast is a barrier: process 0 wrote the marker before anyone reads it
    distributed.broadcast(None)
    if failure is None and not marker.exists():
        failure = f"process 0 wrote {marker.name} there and this process cannot see it"
    failure = distributed.failed_anywhere(failure)
    if distributed.is_main() and marker.exists():
        marker.unlink()
    if failure is not None:
        raise StorageNotShared(
            f"checkpoint_dir {os.fspath(path)!r} is not shared by every worker ({failure}). "
            f"Point checkpoint_dir at storage every node mounts at the same path (NFS, "
            f"Lustre, a bucket through gcsfuse or a gs:// path)")


def report(elastic, metrics: dict, *, step: int, **extra) -> dict:
    """Send `ElasticTrainer.step`'s metrics to `ray.train.report`; returns what was sent.

    Every worker must call it at the same steps (Ray's report is a barrier across the
    group); Ray keeps process 0's metrics, which are the same on every process.
    ``switches`` counts this attempt's mesh switches after its start (a restart begins a
    new count; ``resumed_from`` is the checkpoint step it restored).
    """
    import jax

    train = require_ray()
    history = elastic.history
    resumed = [e.checkpoint_step for e in history if isinstance(e, events.Resume)]
    sent = {"step": int(step), "loss": float(metrics["loss"]), "mesh": str(metrics["mesh"]),
            "samples_per_second": float(metrics["samples_per_second"]),
            "num_devices": jax.device_count(), "workers": jax.process_count(),
            "switches": sum(isinstance(e, events.Switch) and e.reason != "start"
                            for e in history),
            "resumed_from": resumed[0] if resumed else None, **extra}
    train.report(sent)
    return sent


def train_function(loop: Loop, *, checkpoint_dir: str | os.PathLike,
                   wait_for_devices_s: float = 0.0) -> Callable[[dict], None]:
    """`loop` as a Ray Train training function (``train_loop_per_worker``).

    Each worker of each attempt joins the JAX job, checks that `checkpoint_dir` is shared,
    then runs ``loop(config)`` with ``config["checkpoint_dir"]`` set; the loop builds its
    `ElasticTrainer` there with ``resources.Static(jax.device_count())``, so `init`
    resumes from the latest checkpoint onto the best mesh for this group.

    Args:
      loop: the user's training loop, ``loop(config)``.
      checkpoint_dir: storage every worker sees (Orbax checkpoints, compile cache).
      wait_for_devices_s: when the group has fewer devices than the model's ``p_min``
        (`InsufficientDevices`), wait this long before failing, so that Ray's elastic
        resize can restart it with more workers; it never trains on a smaller mesh.
    """
    directory = os.fspath(checkpoint_dir)

    @functools.wraps(loop)  # Ray names the run's workers' function after the user's loop
    def run(config: dict) -> None:
        goodput.begin_attempt()  # Ray may hand this attempt to a pooled, idle process
        join_jax()
        check_shared_storage(directory)
        try:
            loop({**config, CHECKPOINT_DIR: directory})
        except InsufficientDevices as e:
            if wait_for_devices_s > 0:
                log.warning("%s; waiting %.0f s for Ray to add workers", e, wait_for_devices_s)
                time.sleep(wait_for_devices_s)
            raise

    return run


def cpu_worker_env(devices_per_worker: int) -> dict[str, str]:
    """Environment variables giving each Ray worker `devices_per_worker` simulated CPU
    devices (for trying multi-worker jobs on one machine, as ``meshscale launch`` does)."""
    from meshscale.runtime.simulated import cpu_env

    return cpu_env(devices_per_worker)


def jax_trainer(loop: Loop, *, checkpoint_dir: str | os.PathLike,
                num_workers: int | tuple[int, int], use_gpu: bool = False,
                use_tpu: bool = False, resources_per_worker: dict | None = None,
                cpu_devices_per_worker: int | None = None, max_failures: int = 3,
                resize_interval_s: float = 60.0, wait_for_devices_s: float = 0.0,
                config: dict | None = None, env: dict[str, str] | None = None,
                callbacks: list | None = None):
    """A Ray Train `JaxTrainer` running `loop` elastically; call ``.fit()`` on it.

    Args:
      loop, checkpoint_dir, wait_for_devices_s: as for `train_function`. Ray's own run
        records go to ``checkpoint_dir/ray`` (also shared).
      num_workers: a count, or ``(min, max)`` for elastic resizing.
      use_gpu, use_tpu, resources_per_worker: as Ray's `ScalingConfig`.
      cpu_devices_per_worker: simulate this many CPU devices per worker (no GPU/TPU).
      max_failures: restarts after worker failures before the run fails (resizes do
        not count).
      resize_interval_s: how often Ray checks whether the group could grow.
      config: passed to `loop` (with ``checkpoint_dir`` added).
      env: more environment variables for the workers.
      callbacks: `ray.train.UserCallback`s (run in Ray's controller; ``after_report``
        sees every `report`).
    """
    require_ray()
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.v2.jax import JaxConfig, JaxTrainer

    worker_env = {**(cpu_worker_env(cpu_devices_per_worker) if cpu_devices_per_worker
                     else {}), **(env or {})}
    return JaxTrainer(
        train_function(loop, checkpoint_dir=checkpoint_dir,
                       wait_for_devices_s=wait_for_devices_s),
        train_loop_config=dict(config or {}),
        jax_config=JaxConfig(use_gpu=use_gpu, use_tpu=use_tpu),
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                     use_tpu=use_tpu, resources_per_worker=resources_per_worker,
                                     elastic_resize_monitor_interval_s=resize_interval_s),
        run_config=RunConfig(name="ray", storage_path=os.path.abspath(os.fspath(checkpoint_dir))
                             if "://" not in os.fspath(checkpoint_dir)
                             else os.fspath(checkpoint_dir),
                             failure_config=FailureConfig(max_failures=max_failures),
                             callbacks=callbacks,
                             worker_runtime_env={"env_vars": worker_env} if worker_env
                             else None))
