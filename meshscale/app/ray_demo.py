"""`meshscale ray-demo`: an elastic Ray Train job on a local cluster whose nodes come and go.

A Ray head and worker nodes start on this machine (processes standing in for hosts); the
job is `meshscale.integrations.ray.jax_trainer` running `loop`, each worker with
``devices_per_worker`` simulated CPU devices. The driver adds and removes a node as the
schedule says (``WORKERS@STEP``); Ray restarts the group each time, and every restart
resumes the latest checkpoint onto the best mesh for its devices. The driver prints each
restart: the checkpoint it resumed, the try-runs and the decision, the mesh it trains on.

So that a change lands at its step, the workers wait before each step until the driver
allows it (``RUN_DIR/allow``); process 0 appends what happens to ``RUN_DIR/progress.jsonl``.
The loop is otherwise an ordinary meshscale loop.

Never: write outside this demo's own run directory (Ray's own session files aside), delete
a previous run (`meshscale.app.run_dir`), or leave the cluster running.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import threading
import time
from pathlib import Path

DEFAULT_SCHEDULE = "1@0,3@30,1@60"
SLOT = "meshscale_worker"  # one per Ray Train worker a node may host
MB = 1024 * 1024
# Read by Ray's controller, so set before the cluster starts: a shrinking job does not
# wait 60 s for workers that will not come back, and the controller looks at its workers
# (failures, resizes, reports) every 0.5 s instead of 2 s.
RAY_SETTINGS = {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "3",
                "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}


@dataclasses.dataclass(frozen=True)
class RayDemoConfig:
    steps: int = 90
    schedule: str = DEFAULT_SCHEDULE
    devices_per_worker: int = 2
    p_min: int = 2
    model: str = "mlp"
    run_dir: str = "runs/ray-demo"
    seed: int = 0
    global_batch: int = 24
    checkpoint_every: int = 10
    state_sharding: str = "zero1"
    learning_rate: float = 3e-3
    timeout: float = 300.0  # seconds one phase (a restart, a stretch of steps) may take
    overwrite: bool = False  # move an existing run_dir aside to run_dir.old-N first


def parse_schedule(text: str, *, max_workers: int = 8) -> list[tuple[int, int]]:
    """"1@0,3@30" -> [(0, 1), (30, 3)]: (step, workers), sorted, starting at step 0."""
    from meshscale.app.demo import parse_schedule as parse

    return parse(text, max_devices=max_workers, noun="workers", example=DEFAULT_SCHEDULE,
                 limit=f"at most {max_workers} workers")


def loop(config: dict) -> None:
    """The training loop every Ray worker runs (an ordinary ElasticTrainer loop)."""
    import jax
    import optax

    import meshscale as ms
    from meshscale.elastic import events, resources
    from meshscale.integrations import ray as meshscale_ray
    from meshscale.models import registry

    run = Path(config["run_dir"])
    if config.get("import_dir") and config["import_dir"] not in sys.path:
        sys.path.insert(0, config["import_dir"])  # --model module:factory, as the driver
    model, batch_fn = registry.build(config["model"], config["seed"])
    record = ProgressLog(run)

    def on_event(event: events.Event):
        if isinstance(event, events.Start | events.Resume | events.Search | events.Switch
                      | events.Checkpoint):
            record(**{k: v for k, v in event.as_dict().items()
                      if k not in ("time", "device_ids")})

    elastic = ms.ElasticTrainer(
        ms.Trainer(model, optax.adam(config["learning_rate"]),
                   global_batch=config["global_batch"],
                   state_sharding=config.get("state_sharding", "fsdp")),
        checkpoint_dir=config["checkpoint_dir"], resources=resources.Static(jax.device_count()),
        space=ms.SearchSpace(p_min=config["p_min"]), timing=ms.Timing(warmup=1, steps=2),
        switching=ms.SwitchPolicy(check_every=10**9, total_steps=config["steps"]),
        checkpoints=ms.CheckpointPolicy(every=config["checkpoint_every"]),
        metrics=ms.MetricsPolicy(directory=str(run)), on_event=on_event)
    state = elastic.init(batch_fn(config["global_batch"], 0))
    for i in range(int(state.step), config["steps"]):
        with elastic.ledger.spend("idle"):  # held back by the driver's schedule
            wait_until_allowed(run, i)
        state, metrics = elastic.step(state, batch_fn(config["global_batch"], i))
        if (i + 1) % 10 == 0:  # Ray's report is a barrier: not every step
            meshscale_ray.report(elastic, metrics, step=i + 1)
        record(event="step", step=i + 1, loss=float(metrics["loss"]), mesh=metrics["mesh"],
               samples_per_second=float(metrics["samples_per_second"]))
    elastic.close()  # the last step saved, every write and the metrics finished


class ProgressLog:
    """Process 0 of a Ray attempt appends what happens to ``RUN/progress.jsonl``, one JSON
    line per call, tagged with the attempt (process 0's pid) and its worker and device
    counts; the other processes write nothing. Collective: every process constructs it."""

    def __init__(self, run: Path):
        import jax

        from meshscale.runtime import distributed

        self.path, self.main = Path(run) / "progress.jsonl", distributed.is_main()
        self.attempt = distributed.broadcast(os.getpid())
        self.tags = {"attempt": self.attempt, "workers": jax.process_count(),
                     "devices": jax.device_count()}

    def __call__(self, **line) -> None:
        from meshscale.app import report

        if self.main:
            with open(self.path, "a") as f:
                f.write(json.dumps(report.to_plain({**self.tags, **line})) + "\n")


def allowed(run: Path) -> int:
    """The last step the driver lets the workers train (``RUN/allow``; 0 before it exists)."""
    try:
        return int((Path(run) / "allow").read_text())
    except (FileNotFoundError, ValueError):
        return 0


def wait_until_allowed(run: Path, step: int) -> None:
    """Blocks before training step ``step`` until the driver allows it, so that a change of
    workers lands at its step."""
    while allowed(run) <= step:
        time.sleep(0.05)


def run(cfg: RayDemoConfig) -> list[dict]:
    """Run the demo; returns one summary row per attempt (also printed)."""

    from meshscale.app import run_dir as run_dirs
    from meshscale.app import terminal
    from meshscale.integrations import ray as meshscale_ray

    meshscale_ray.require_ray()
    import ray
    from ray.cluster_utils import Cluster

    schedule = parse_schedule(cfg.schedule)
    console = terminal.console()
    # no --resume here: the driver's schedule and progress file start at step 0
    moved = run_dirs.take(run_dirs.plan(cfg.run_dir, resume=None, overwrite=cfg.overwrite))
    if moved is not None:
        console.print(f"moved the previous {cfg.run_dir} to {moved} (nothing deleted)",
                      markup=False, highlight=False, soft_wrap=True)
    run_dir = Path(cfg.run_dir).resolve()
    os.environ.update(RAY_SETTINGS)
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "resources": {SLOT: 1}, "object_store_memory": 100 * MB,
        "include_dashboard": False})
    extra = None  # the node holding every worker past the head's one
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        trainer = meshscale_ray.jax_trainer(
            loop, checkpoint_dir=run_dir / "checkpoints", num_workers=(1, max(
                w for _, w in schedule)), resources_per_worker={SLOT: 1},
            cpu_devices_per_worker=cfg.devices_per_worker, resize_interval_s=1.0,
            max_failures=2 * len(schedule),  # a node removed counts as a failure
            config={**dataclasses.asdict(cfg), "run_dir": str(run_dir),
                    "import_dir": os.getcwd()})
        outcome: dict = {}
        fit = threading.Thread(target=lambda: _fit(trainer, outcome), daemon=True)
        fit.start()
        watch = _Watcher(run_dir, console, fit, outcome, cfg.timeout)
        for index, (step, workers) in enumerate(schedule):
            if index:  # Ray restarts the group when the node comes or goes
                if extra is not None:
                    cluster.remove_node(extra)
                    extra = None
                if workers > 1:
                    extra = cluster.add_node(num_cpus=0, resources={SLOT: workers - 1},
                                             object_store_memory=80 * MB)
                console.print(f"[bold]step {step}: the cluster now has room for {workers} "
                              f"worker(s)[/]")
            watch.until(lambda x, w=workers: x["workers"] == w and
                        x["event"] in ("start", "resume") and x["attempt"] not in watch.seen,
                        f"a group of {workers} worker(s)")
            watch.seen.add(watch.attempt)
            end = schedule[index + 1][0] if index + 1 < len(schedule) else cfg.steps
            (run_dir / "allow").write_text(str(end))
            watch.until(lambda x, e=end: x["event"] == "step" and x["step"] == e and
                        x["attempt"] == watch.attempt, f"step {end}")
        fit.join(cfg.timeout)
        if "error" in outcome:
            raise outcome["error"]
    finally:
        (run_dir / "allow").write_text(str(10**9))
        ray.shutdown()
        cluster.shutdown()
        for key in RAY_SETTINGS:
            os.environ.pop(key, None)
    rows = watch.summary()
    _print_summary(console, rows, run_dir)
    return rows


def _print_summary(console, rows: list[dict], run_dir: Path) -> None:
    """One row per attempt, then the goodput of the whole run (every attempt)."""
    from rich.table import Table

    from meshscale.app import goodput_view
    from meshscale.observe import goodput
    from meshscale.observe.writers import read_jsonl

    table = Table(title="attempts (each a Ray worker group)")
    for column in ("attempt", "workers", "devices", "resumed from", "mesh", "steps trained",
                   "of which again", "last loss"):
        table.add_column(column)
    for row in rows:
        table.add_row(*(str(row[k]) for k in ("attempt", "workers", "devices", "resumed_from",
                                              "mesh", "steps", "again", "loss")))
    console.print(table)
    run_goodput = goodput.of_run(read_jsonl(run_dir / "metrics.jsonl"))
    console.print(goodput_view.goodput_table(run_goodput))
    console.print(goodput_view.goodput_line(run_goodput) + " (every attempt: process start, "
                  "JAX init and the gaps between attempts count as badput)", markup=False,
                  highlight=False)
    console.print(f"checkpoints: {run_dir / 'checkpoints'}; progress: "
                  f"{run_dir / 'progress.jsonl'}; metrics: {run_dir / 'metrics.jsonl'}")


def _fit(trainer, outcome: dict) -> None:
    try:
        outcome["result"] = trainer.fit()
    except BaseException as e:  # noqa: B036 (re-raised by the main thread)
        outcome["error"] = e


class _Watcher:
    """Follows process 0's progress file and prints each restart as it happens."""

    def __init__(self, run_dir: Path, console, fit: threading.Thread, outcome: dict,
                 timeout: float):
        self.path, self.console, self.fit = run_dir / "progress.jsonl", console, fit
        self.outcome, self.timeout = outcome, timeout
        self.lines: list[dict] = []
        self.seen: set[int] = set()
        self.attempt: int | None = None
        self._pending_search = None
        self._cursor = 0  # lines before it are printed

    def until(self, predicate, what: str) -> dict:
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            self._read_new()
            while self._cursor < len(self.lines):  # each line printed once, in order
                line = self.lines[self._cursor]
                self._cursor += 1
                self._print(line)
                if predicate(line):
                    if line["event"] in ("start", "resume"):
                        self.attempt = line["attempt"]
                    return line
            if not self.fit.is_alive():
                raise RuntimeError(f"the Ray job ended before {what}: "
                                   f"{self.outcome.get('error')!r}")
            time.sleep(0.2)
        raise TimeoutError(f"no {what} within {self.timeout:.0f} s (see {self.path})")

    def _read_new(self) -> None:
        if self.path.exists():
            text = self.path.read_text()
            complete = text[: text.rfind("\n") + 1].splitlines()  # not a line being written
            self.lines += [json.loads(x) for x in complete[len(self.lines):]]

    def _print(self, line: dict) -> None:
        from meshscale.app import report, terminal

        kind = line["event"]
        if kind in ("start", "resume"):
            what = (f"resumed checkpoint step {line['checkpoint_step']}" if kind == "resume"
                    else "started from scratch")
            self.console.print(f"[bold]restart[/]: group of {line['workers']} worker(s), "
                               f"{line['devices']} devices: {what}")
        elif kind == "search":
            self._pending_search = line
            self.console.print(report.tryrun_table(line["decision"],
                                                   title=terminal.search_title(line)))
        elif kind == "switch" and self._pending_search is not None:
            self.console.print(report.decision_words(self._pending_search, line))
            self._pending_search = None
        elif kind == "step" and line["step"] % 10 == 0:
            self.console.print(f"  step {line['step']}: loss {line['loss']:.3f}, mesh "
                               f"{line['mesh']}, {line['samples_per_second']:.0f} samples/s")

    def _trained_again(self, rows: list[dict], began: dict) -> str:
        """The steps this attempt trains again: those since the checkpoint it resumed."""
        if not rows or rows[-1]["steps"] == "-" or began["event"] != "resume":
            return "-"
        last = int(rows[-1]["steps"].split("-")[1])
        return f"{began['checkpoint_step'] + 1}-{last}" if last > began["checkpoint_step"] \
            else "-"

    def summary(self) -> list[dict]:
        self._read_new()
        rows = []
        for attempt in dict.fromkeys(x["attempt"] for x in self.lines):
            mine = [x for x in self.lines if x["attempt"] == attempt]
            began = next(x for x in mine if x["event"] in ("start", "resume"))
            steps = [x for x in mine if x["event"] == "step"]
            rows.append({"attempt": len(rows) + 1, "workers": began["workers"],
                         "devices": began["devices"],
                         "resumed_from": began.get("checkpoint_step", "-"),
                         "mesh": steps[-1]["mesh"] if steps else "-",
                         "steps": f"{steps[0]['step']}-{steps[-1]['step']}" if steps else "-",
                         "again": self._trained_again(rows, began),
                         "loss": f"{steps[-1]['loss']:.3f}" if steps else "-"})
        return rows
