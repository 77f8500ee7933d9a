"""meshscale under Ray Train's elastic JaxTrainer, on a local multi-node Ray cluster.

One Ray cluster (a head and worker nodes, each a set of processes on this machine) serves
the module; every job is bounded by timeouts and the cluster is torn down even when a test
fails. Each Ray worker gets 2 simulated CPU devices, so the job's device count follows its
worker count. The loop the workers run is tests/ray_worker.py.
"""

from __future__ import annotations

import builtins
import functools
import itertools
import json
import os
import pathlib
import signal
import threading
import time

import numpy as np
import pytest

from meshscale import MeshShape, Trainer
from meshscale.observe import goodput
from meshscale.observe.writers import read_jsonl
from tests import ray_worker as worker
from tests.helpers import SIMPLE_TOL, make_model, make_optimizer

pytestmark = pytest.mark.xdist_group("ray")

ROOT = str(pathlib.Path(__file__).resolve().parents[1])
DEVICES_PER_WORKER = 2
TOTAL_STEPS = 14
WAIT = 120  # seconds any one phase may take on a loaded 2-core machine
SLOT = "meshscale_worker"  # a custom resource: one per Ray Train worker a node may host
MB = 1024 * 1024
RAY_SETTINGS = {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "3",
                "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25"}


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster whose head can host one training worker; tests add nodes."""
    import ray
    from ray.cluster_utils import Cluster

    # Set before the cluster starts, so Ray's controller reads them. Without the first a
    # shrinking job waits 60 s for workers that will not come back; the second is how
    # often the controller looks at its workers (failures, resizes, and the queue of
    # `ray.train.report`s, which lets a worker report about once per look: 2 s by default).
    os.environ.update(RAY_SETTINGS)
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "resources": {SLOT: 1}, "object_store_memory": 80 * MB,
        "include_dashboard": False})
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
        for key in RAY_SETTINGS:
            os.environ.pop(key, None)


def add_node(cluster, slots: int):
    return cluster.add_node(num_cpus=0, resources={SLOT: slots}, object_store_memory=80 * MB)


class Job:
    """`meshscale_ray.jax_trainer(...).fit()` in a helper thread (Ray's `Cluster.add_node`
    must run on the main thread), and what its process 0 wrote."""

    def __init__(self, tmp_path, *, num_workers, steps=TOTAL_STEPS, max_failures=3,
                 wait_for_devices_s=0.0, **config):
        from meshscale.integrations import ray as meshscale_ray
        from tests.ray_callback import ReportedMetrics

        self.out = tmp_path / "out"
        self.out.mkdir()
        self.trainer = meshscale_ray.jax_trainer(
            worker.loop, checkpoint_dir=tmp_path / "run", num_workers=num_workers,
            resources_per_worker={SLOT: 1}, cpu_devices_per_worker=DEVICES_PER_WORKER,
            max_failures=max_failures, resize_interval_s=1.0,
            wait_for_devices_s=wait_for_devices_s,
            config={"out": str(self.out), "steps": steps, **config},
            env={"PYTHONPATH": ROOT, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"},
            callbacks=[ReportedMetrics(str(self.out / "reported.jsonl"))])
        self.result, self.error = None, None
        self.thread = threading.Thread(target=self._fit, daemon=True)
        self.thread.start()

    def _fit(self):
        try:
            self.result = self.trainer.fit()
        except BaseException as e:  # noqa: B036 (reported by the test thread)
            self.error = e

    def allow(self, step: int) -> None:
        (self.out / "allow").write_text(str(step))

    def lines(self) -> list[dict]:
        path = self.out / "progress.jsonl"
        text = path.read_text() if path.exists() else ""
        return [json.loads(x) for x in text[: text.rfind("\n") + 1].splitlines()]

    def wait_for(self, what: str, predicate, timeout: float = WAIT) -> dict:
        """The first progress line that satisfies `predicate`; fails on timeout or when
        the job ended first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [line for line in self.lines() if predicate(line)]
            if found:
                return found[0]
            if not self.thread.is_alive():
                pytest.fail(f"the job ended before {what}: {self.error!r}\n{self.tail()}")
            time.sleep(0.2)
        pytest.fail(f"no {what} within {timeout} s\n{self.tail()}")

    def join(self, timeout: float = WAIT):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"the job did not end within {timeout} s"

    def tail(self) -> str:
        return "\n".join(json.dumps(line) for line in self.lines()[-15:])

    def kill_a_worker(self, attempt: int) -> None:
        """SIGKILL a worker other than process 0 of `attempt`."""
        pids = sorted(self.out.glob(f"pids/{attempt}-*"))
        victim = next(p for p in pids if not p.name.endswith("-0"))
        os.kill(int(victim.read_text()), signal.SIGKILL)


@functools.cache
def uninterrupted_losses() -> list[float]:
    """The same training without restarts, on one fixed mesh in this process."""
    shape = MeshShape(2, 4, 2)
    trainer = Trainer(make_model("mlp"), make_optimizer(), global_batch=worker.BATCH)
    state, step, losses = trainer.init_state(shape), trainer.compile_step(shape), []
    for i in range(TOTAL_STEPS):
        state, metrics = step(state, trainer.put_batch(worker.host_batch(i), shape))
        losses.append(float(metrics["loss"]))
    return losses


def test_restarts_by_ray_resume_the_latest_checkpoint_on_the_new_device_count(cluster,
                                                                               tmp_path):
    """1 worker -> 3 (a node added) -> a worker killed -> 1 (the node removed): every
    restart resumes the latest checkpoint onto a mesh of its devices, and every step
    trained, twice or once, has the loss of an uninterrupted fixed-mesh run."""
    start = time.monotonic()
    second = None
    job = Job(tmp_path, num_workers=(1, 3))
    try:
        job.allow(4)  # steps 1-4 on one worker; checkpoint at 3
        one = job.wait_for("step 4", lambda x: x.get("step") == 4)
        second = add_node(cluster, 2)  # Ray restarts the group as 3 workers
        three = job.wait_for("3 workers", lambda x: x["workers"] == 3)
        job.allow(8)  # step 4 again, then to 8; checkpoint at 6
        job.wait_for("step 8 on 3 workers", lambda x: x["workers"] == 3 and x.get("step") == 8)
        job.kill_a_worker(three["attempt"])  # the others fail fast; Ray retries
        again = job.wait_for("a restart after the kill", lambda x: x["workers"] == 3 and
                             x["attempt"] != three["attempt"])
        job.allow(11)  # steps 7, 8 again, then to 11; checkpoint at 9
        job.wait_for("step 11", lambda x: x["attempt"] == again["attempt"] and
                     x.get("step") == 11)
        cluster.remove_node(second)  # Ray restarts the group as 1 worker
        second = None
        job.wait_for("1 worker again", lambda x: x["workers"] == 1 and x["attempt"] not in (
            one["attempt"], three["attempt"], again["attempt"]))
        job.allow(TOTAL_STEPS)
        job.join()
    finally:  # a run still going ends with its nodes (or the cluster, at the module's end)
        job.allow(10**6)
        if second is not None:
            cluster.remove_node(second)
    assert job.error is None, repr(job.error)
    lines = job.lines()
    attempts = list(dict.fromkeys(line["attempt"] for line in lines))
    assert [next(x["workers"] for x in lines if x["attempt"] == a) for a in attempts] \
        == [1, 3, 3, 1], job.tail()
    checkpoints: list[int] = []
    for attempt in attempts:
        mine = [x for x in lines if x["attempt"] == attempt]
        began = next(x for x in mine if x["event"] in ("start", "resume"))
        if attempt == attempts[0]:
            assert began["event"] == "start"
        else:  # the latest checkpoint of the attempts before, onto this group's devices
            assert began["event"] == "resume" and began["checkpoint_step"] == max(checkpoints)
        switch = next(x for x in mine if x["event"] == "switch")
        assert MeshShape.parse(switch["after"]).num_devices == began["devices"] \
            == DEVICES_PER_WORKER * began["workers"]
        steps = [x for x in mine if x["event"] == "step"]
        assert all(x["mesh"] == switch["after"] for x in steps)
        first_step = began.get("checkpoint_step") or 0
        assert [x["step"] for x in steps] == list(range(first_step + 1, steps[-1]["step"] + 1))
        checkpoints += [x["checkpoint_step"] for x in mine if x["event"] == "checkpoint"]
    trained = [x for x in lines if x["event"] == "step"]
    assert sorted({x["step"] for x in trained}) == list(range(1, TOTAL_STEPS + 1))
    assert len(trained) > TOTAL_STEPS  # some steps were trained twice, after restarts
    expected = uninterrupted_losses()
    for x in trained:
        np.testing.assert_allclose(x["loss"], expected[x["step"] - 1], rtol=SIMPLE_TOL,
                                   err_msg=f"step {x['step']} of attempt {x['attempt']}")
    reported = [json.loads(x) for x in (job.out / "reported.jsonl").read_text().splitlines()]
    for r in reported:  # a step whose report a killed peer never joined is not there
        np.testing.assert_allclose(r["loss"], expected[r["step"] - 1], rtol=SIMPLE_TOL)
    assert {r["step"] for r in reported} == set(range(1, TOTAL_STEPS + 1))
    last = reported[-1]  # process 0's last ray.train.report, as Ray's controller saw it
    assert last["step"] == TOTAL_STEPS and last["workers"] == 1
    assert last["resumed_from"] == began["checkpoint_step"]  # the last attempt's
    assert last["mesh"] == switch["after"] and last["samples_per_second"] > 0
    # goodput of the whole run, every attempt (its process start and JAX init included)
    run = goodput.of_run(read_jsonl(tmp_path / "run" / "metrics.jsonl"))
    assert run["attempts"] == 4, run
    seconds = run["seconds"]
    assert seconds["retrained"] > 0  # steps 4, 7 and 8 were trained again
    assert min(seconds["startup"], seconds[goodput.BETWEEN_ATTEMPTS], seconds["restore"],
               seconds["productive"], seconds["idle"]) > 0, seconds  # idle: held by allow
    # measured outside the workers: no more than the test's time, no less than the
    # first attempt's first line to the last attempt's last
    first_joined = next(x["time"] for x in lines if x["event"] == "joined")
    last_step = trained[-1]["time"]  # the last attempt closes its trainer after this
    assert last_step - first_joined <= run["wall_seconds"] <= time.monotonic() - start, \
        (run, last_step - first_joined)
    times = [x["time"] for x in lines if x["event"] == "joined"] + [last_step]
    print(f"goodput {run['goodput']:.0%} of {run['wall_seconds']:.1f} s: {seconds}")
    print(f"ray elastic scenario: {time.monotonic() - start:.1f} s; attempts (joined to "
          f"next joined): {[round(b - a, 1) for a, b in itertools.pairwise(times)]}")


def test_fewer_devices_than_p_min_fails_with_insufficient_devices_and_never_trains(
        cluster, tmp_path):
    """A group of 1 worker (2 devices) for a model that needs p_min=4 stages: the job
    fails with meshscale's message and no step runs (as after a shrink below p_min)."""
    job = Job(tmp_path, num_workers=1, max_failures=0, p_min=4)
    job.allow(10**6)
    job.join()
    assert "InsufficientDevices" in repr(job.error) and "p_min=4" in repr(job.error)
    assert [x["event"] for x in job.lines()] == ["joined"], job.tail()


def test_storage_a_process_cannot_see_is_refused_on_every_process(tmp_path, monkeypatch):
    """As process 1 of a job whose process 0 wrote its marker on another node's disk."""
    from meshscale import StorageNotShared
    from meshscale.integrations import ray as meshscale_ray
    from meshscale.runtime import distributed

    meshscale_ray.check_shared_storage(tmp_path / "shared")  # one process: it sees it
    assert list((tmp_path / "shared").iterdir()) == []  # the marker is removed
    monkeypatch.setattr(distributed, "is_main", lambda: False)
    monkeypatch.setattr(distributed, "broadcast", lambda value: "token-of-process-0")
    with pytest.raises(StorageNotShared, match="cannot see it.*storage every node mounts"):
        meshscale_ray.check_shared_storage(tmp_path / "shared")
    (tmp_path / "file").write_text("")
    with pytest.raises(StorageNotShared, match="cannot create it"):
        meshscale_ray.check_shared_storage(tmp_path / "file" / "run")


def test_insufficient_devices_waits_for_ray_to_add_workers_then_fails(tmp_path, monkeypatch):
    from meshscale import InsufficientDevices
    from meshscale.integrations import ray as meshscale_ray

    monkeypatch.setattr(meshscale_ray, "join_jax", lambda: None)

    def loop(config):
        assert config == {"steps": 3, "checkpoint_dir": str(tmp_path)}
        raise InsufficientDevices("2 devices available, the model needs p_min=4")

    run = meshscale_ray.train_function(loop, checkpoint_dir=tmp_path, wait_for_devices_s=0.3)
    start = time.monotonic()
    with pytest.raises(InsufficientDevices, match="p_min=4"):
        run({"steps": 3})
    assert time.monotonic() - start >= 0.3


def test_ray_demo_command_refuses_a_bad_schedule(capsys):
    from meshscale.app.cli import main

    assert main(["ray-demo", "--schedule", "3@5"]) == 2
    assert "the first entry must be at step 0" in capsys.readouterr().err


def test_ray_demo_never_deletes_a_previous_run(tmp_path, capsys):
    """A run directory holding a ray-demo run is refused before any cluster starts (the
    command has no --resume: --overwrite moves the old run aside); the run is untouched."""
    from meshscale.app.cli import main
    from tests.helpers import contents

    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / "state" / "30").mkdir(parents=True)
    (run_dir / "checkpoints" / "state" / "30" / "array").write_bytes(b"saved")
    (run_dir / "progress.jsonl").write_text('{"event": "step", "step": 30}\n')
    before = contents(run_dir)
    assert main(["ray-demo", "--run-dir", str(run_dir)]) == 2
    assert capsys.readouterr().err == (
        f"meshscale ray-demo: error: --run-dir {run_dir} holds a run (checkpoints up to step "
        f"30): pass --overwrite to start over (the old run is moved to {run_dir}.old-1, "
        f"nothing is deleted)\n")
    assert contents(run_dir) == before and os.listdir(tmp_path) == ["run"]


def test_missing_ray_names_the_extra(monkeypatch):
    from meshscale.integrations import ray as meshscale_ray

    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray" or name.startswith("ray."):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    with pytest.raises(ImportError, match=r"pip install 'meshscale\[ray\]'"):
        meshscale_ray.require_ray()
