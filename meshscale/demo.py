"""The demo job: a GPT learns Python source while its device count changes.

It is an ordinary `ElasticTrainer` run driven by a `resources.FileSource` whose file the
demo itself rewrites on a schedule, exactly as a scheduler or operator would: the demo
uses only the public API. Run it with `meshscale demo` (or `make demo`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import sys

# 7 devices (not a multiple of p_min 2) go down the vertical path: 8 layers on 7 stages.
DEFAULT_SCHEDULE = "4@0,8@80,7@160,3@240,8@320"


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    steps: int = 400
    schedule: str = DEFAULT_SCHEDULE
    devices: int = 8
    p_min: int = 2
    model: str = "gpt-tiny"
    run_dir: str = "runs/demo"
    seed: int = 0
    resume: bool = False
    global_batch: int = 24
    check_every: int = 10
    checkpoint_every: int = 40
    learning_rate: float = 3e-3
    # A tiny model's state is small next to its activations: ZeRO-1 needs no more memory
    # than FSDP here and steps 2-3x faster on simulated CPU devices (benchmarks/memory.py).
    state_sharding: str = "zero1"


def parse_schedule(text: str, *, max_devices: int) -> list[tuple[int, int]]:
    """"4@0,8@80" -> [(0, 4), (80, 8)]: (step, devices) sorted by step, starting at 0."""
    try:
        pairs = sorted((int(step), int(count)) for count, step in
                       (item.strip().split("@") for item in text.split(",") if item.strip()))
    except ValueError as e:
        raise ValueError(f"bad --schedule {text!r}: write DEVICES@STEP,... e.g. "
                         f"{DEFAULT_SCHEDULE}") from e
    if not pairs or pairs[0][0] != 0:
        raise ValueError(f"bad --schedule {text!r}: the first entry must be at step 0 (N@0)")
    for _, count in pairs:
        if not 1 <= count <= max_devices:
            raise ValueError(f"bad --schedule {text!r}: {count} devices is outside 1..{max_devices}"
                             f" (raise --devices)")
    return pairs


def devices_at(schedule: list[tuple[int, int]], step: int) -> int:
    return [count for start, count in schedule if start <= step][-1]


def run(cfg: DemoConfig) -> dict:
    """Run the demo; returns the report data (also written to RUN_DIR/report.json)."""
    import jax
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from meshscale import report
    from meshscale.compile_cache import enable_persistent_cache
    from meshscale.model import FunctionalModel
    from meshscale.resources import FileSource
    from models import registry

    console = Console(width=None if sys.stdout.isatty() else 120)
    schedule = parse_schedule(cfg.schedule, max_devices=min(cfg.devices, jax.device_count()))
    # Beside the run dir, so a fresh run (which replaces the run dir) still finds it.
    enable_persistent_cache(os.path.join(os.path.dirname(os.path.abspath(cfg.run_dir)),
                                         ".jax_cache"))
    model, batch_fn = registry.build(cfg.model, cfg.seed)
    _prepare_run_dir(cfg.run_dir, resume=cfg.resume)
    previous = _previous_report(cfg.run_dir) if cfg.resume else None

    device_file = os.path.join(cfg.run_dir, "devices.txt")
    FileSource.write(device_file, devices_at(schedule, 0))
    pending: dict = {}

    def on_event(event):
        if event["event"] == "search":
            pending["search"] = event
            console.print(report.tryrun_table(report.to_plain(event["decision"]),
                                              title=f"try-runs on {event['num_devices']} devices"))
            if not event["decision"].switch:
                console.print(report.decision_words(report.to_plain(event)))
        elif event["event"] == "switch" and "search" in pending:
            console.print(report.decision_words(report.to_plain(pending.pop("search")),
                                                report.to_plain(event)))
        elif event["event"] == "checkpoint" and "save" in pending:
            pending["save"]()  # the record on disk is never behind the checkpoint
        elif event["event"] in ("devices_changed", "resume"):
            console.print(f"[bold]{event['event'].replace('_', ' ')}[/]: "
                          + ", ".join(f"{k}={v}" for k, v in event.items()
                                      if k not in ("event", "time", "device_ids")))

    elastic = elastic_trainer(cfg, model, FileSource(device_file), on_event=on_event)
    if cfg.resume:  # the devices the schedule grants at the step we resume from
        FileSource.write(device_file,
                         devices_at(schedule, elastic.checkpointer.latest_step() or 0))
    state = elastic.init(batch_fn(cfg.global_batch, 0))
    first = int(state.step)
    config = dataclasses.asdict(cfg)

    def save_report():
        out = report.run_data(elastic, config=config)
        if cfg.resume:
            before = previous or {"steps": [], "events": []}
            out["steps"] = [s for s in before["steps"] if s["step"] <= first] + out["steps"]
            out["events"] = before["events"] + [{"event": "restart", "step": first}] \
                + out["events"]
        report.write_json(out, os.path.join(cfg.run_dir, "report.json"))
        return out

    pending["save"] = save_report

    columns = [TextColumn("step {task.completed}/{task.total}"), BarColumn(),
               TextColumn("{task.fields[info]}"), TimeElapsedColumn()]
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("train", total=cfg.steps, completed=first, info="")
        for i in range(first, cfg.steps):
            count = devices_at(schedule, i)
            if i > first and count != devices_at(schedule, i - 1):
                FileSource.write(device_file, count)
            state, metrics = elastic.step(state, batch_fn(cfg.global_batch, i))
            last = elastic.last_record  # the newest fetched loss: no wait on this step
            progress.update(task, completed=i + 1, info=(
                f"loss {last.loss if last else math.nan:.3f} (step {last.step if last else '-'})"
                f"  {metrics['samples_per_second']:7.1f} samples/s  mesh {metrics['mesh']}"))
            if (i + 1) % 20 == 0:
                save_report()
    elastic.close()  # the last checkpoint on disk
    out = save_report()
    if cfg.model == "gpt-tiny":
        from models.gpt import sample

        fmodel, _ = FunctionalModel.of(model)
        trained = fmodel.merge(jax.device_get(state.params))
        out["sample"] = sample(trained, b"def ", 160, seed=cfg.seed).decode("utf-8", "replace")
        report.write_json(out, os.path.join(cfg.run_dir, "report.json"))
    png = report.plot(out, os.path.join(cfg.run_dir, "report.png"))
    console.print(report.summary_table(out))
    if "sample" in out:
        console.print("[bold]sampled from the trained model:[/]\ndef " + out["sample"])
    console.print(f"report: {os.path.join(cfg.run_dir, 'report.json')}, {png}")
    return out


def elastic_trainer(cfg: DemoConfig, model, resources, *, on_event=None,
                    search_options: dict | None = None):
    """The demo's `ElasticTrainer` for `cfg` (`search_options` added to its own)."""
    import optax

    from meshscale.elastic import ElasticTrainer

    return ElasticTrainer(
        model, optax.adam(cfg.learning_rate), global_batch=cfg.global_batch,
        checkpoint_dir=os.path.join(cfg.run_dir, "checkpoints"), p_min=cfg.p_min,
        resources=resources, check_every=cfg.check_every,
        total_steps=cfg.steps, checkpoint_every=cfg.checkpoint_every, on_event=on_event,
        persistent_cache=False, search_options={"warmup": 1, "steps": 3,
                                                **(search_options or {})},
        state_sharding=cfg.state_sharding)


RUN_DIR_MARKERS = ("report.json", "devices.txt", "checkpoints")


def _prepare_run_dir(run_dir: str, *, resume: bool) -> None:
    """A fresh run replaces a previous demo run's directory, never anything else."""
    if not resume and os.path.isdir(run_dir) and os.listdir(run_dir):
        if not any(os.path.exists(os.path.join(run_dir, m)) for m in RUN_DIR_MARKERS):
            raise FileExistsError(f"--run-dir {run_dir} is not empty and holds no demo run: "
                                  f"choose another --run-dir")
        shutil.rmtree(run_dir)
    os.makedirs(run_dir, exist_ok=True)


def _previous_report(run_dir: str) -> dict | None:
    path = os.path.join(run_dir, "report.json")
    if not os.path.exists(path):
        logging.getLogger(__name__).warning("no report.json in %s: starting its record anew",
                                            run_dir)
        return None
    with open(path) as f:
        return json.load(f)
