"""The demo job: a GPT learns Python source while its device count changes.

It is an ordinary `ElasticTrainer` run driven by a `resources.FileSource` whose file the
demo itself rewrites on a schedule, exactly as a scheduler or operator would: the demo
uses only the public API. The text models read their text through `meshscale.data`
(an ArrayRecord file of the stdlib's source the demo writes into its run directory).
Run it with `meshscale demo` (or `make demo`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shlex
import sys

from meshscale import (
    CheckpointPolicy,
    ElasticTrainer,
    MetricsPolicy,
    SearchSpace,
    SwitchPolicy,
    Timing,
    Trainer,
)

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
    overwrite: bool = False  # move an existing run_dir aside to run_dir.old-N first
    global_batch: int = 24
    check_every: int = 10
    checkpoint_every: int = 40
    learning_rate: float = 3e-3
    # A tiny model's state is small next to its activations: ZeRO-1 needs no more memory
    # than FSDP here and steps 2-3x faster on simulated CPU devices (benchmarks/memory.py).
    state_sharding: str = "zero1"


def parse_schedule(text: str, *, max_devices: int, noun: str = "devices",
                   example: str = DEFAULT_SCHEDULE,
                   limit: str = "raise --devices") -> list[tuple[int, int]]:
    """"4@0,8@80" -> [(0, 4), (80, 8)]: (step, count) sorted by step, starting at 0.

    `noun` is what is counted (ray-demo schedules "workers"), `example` a valid schedule
    and `limit` how to allow more than `max_devices`; the errors speak of them."""
    try:
        pairs = sorted((int(step), int(count)) for count, step in
                       (item.strip().split("@") for item in text.split(",") if item.strip()))
    except ValueError as e:
        raise ValueError(f"bad --schedule {text!r}: write {noun.upper()}@STEP,... e.g. "
                         f"{example}") from e
    if not pairs or pairs[0][0] != 0:
        raise ValueError(f"bad --schedule {text!r}: the first entry must be at step 0 (N@0: "
                         f"{noun} at the start)")
    for _, count in pairs:
        if not 1 <= count <= max_devices:
            raise ValueError(f"bad --schedule {text!r}: {count} {noun} is outside "
                             f"1..{max_devices} ({limit})")
    return pairs


def devices_at(schedule: list[tuple[int, int]], step: int) -> int:
    return [count for start, count in schedule if start <= step][-1]


def run(cfg: DemoConfig) -> dict:
    """Run the demo; returns the report data (also written to RUN_DIR/report.json).

    Everything it writes lives in ``cfg.run_dir``, which must be new or empty unless
    ``cfg.resume`` (continue its run) or ``cfg.overwrite`` (move it aside first): see
    `meshscale.app.run_dir`. A SIGTERM or SIGINT that makes the trainer stop (`Interrupted`,
    raised from `ElasticTrainer.step` once the step is saved) writes the report, prints
    how to resume, and is raised again.
    """
    import jax

    from meshscale.app import report, terminal
    from meshscale.app import run_dir as run_dirs
    from meshscale.elastic.resources import FileSource
    from meshscale.errors import Interrupted
    from meshscale.models import registry
    from meshscale.training.compile_cache import enable_persistent_cache

    console = terminal.console()
    schedule = parse_schedule(cfg.schedule, max_devices=min(cfg.devices, jax.device_count()))
    planned = run_dirs.plan(cfg.run_dir, resume=cfg.resume, overwrite=cfg.overwrite)
    model, batch_fn = registry.build(cfg.model, cfg.seed)  # before anything is written
    moved = run_dirs.take(planned, reuse=("jax_cache",))  # its compiles, not its run
    if moved is not None:
        console.print(f"moved the previous {cfg.run_dir} to {moved} (nothing deleted)",
                      markup=False, highlight=False, soft_wrap=True)
    previous = _read_report(cfg.run_dir) if cfg.resume else None
    enable_persistent_cache(os.path.join(cfg.run_dir, "jax_cache"))

    device_file = os.path.join(cfg.run_dir, "devices.txt")
    FileSource.write(device_file, devices_at(schedule, 0))
    pending: dict = {}
    on_event = _event_printer(console, pending, check_every=cfg.check_every)

    elastic = elastic_trainer(cfg, model, FileSource(device_file), on_event=on_event)
    if cfg.resume:  # the devices the schedule grants at the step we resume from
        FileSource.write(device_file,
                         devices_at(schedule, elastic.checkpointer.latest_step() or 0))
    data = _text_batches(cfg, model)  # None: the model's own batches
    state = elastic.init(data or batch_fn(cfg.global_batch, 0))
    first = int(state.step)
    config = dataclasses.asdict(cfg)
    if previous is not None and not _same_run(previous, cfg, first):
        previous = None
    stopped: list[dict] = []  # the interrupt, once one stops the job

    def save_report():
        out = report.run_data(elastic, config=config)
        out["events"] += stopped
        if cfg.resume:
            before = previous or {"steps": [], "events": []}
            out["steps"] = [s for s in before["steps"] if s["step"] <= first] + out["steps"]
            out["events"] = before["events"] + [{"event": "restart", "step": first}] \
                + out["events"]
        report.write_json(out, os.path.join(cfg.run_dir, "report.json"))
        return out

    pending["save"] = save_report

    try:
        state = _train_loop(cfg, console, elastic, state, first, schedule, device_file,
                            (lambda i: data) if data else
                            (lambda i: batch_fn(cfg.global_batch, i)), save_report)
    except Interrupted as stop:
        elastic.close()  # the saved step's write finished (a second close does nothing)
        stopped.append({"event": "interrupted", "step": stop.step,
                        "signal": stop.signal_name, "directory": str(stop.directory)})
        save_report()
        print(f"stopped by {stop.signal_name} at step {stop.step} (saved in "
              f"{stop.directory}): resume with: {resume_command(cfg)}", file=sys.stderr,
              flush=True)
        raise
    elastic.close()  # the last checkpoint on disk
    if data is not None:
        data.close()
    return _finish(cfg, console, model, state, save_report())


def _text_batches(cfg: DemoConfig, model):
    """`Batches` over RUN_DIR/data/text.array_record (written once from the stdlib's
    text, windows of ``seq_len + 1`` bytes) for the text models; None for the others."""
    if not cfg.model.startswith(("gpt-", "llama-")) or ":" in cfg.model:
        return None
    from meshscale.data import Batches
    from meshscale.models.text import records, stdlib_text, windows, write_records

    path = os.path.join(cfg.run_dir, "data", "text.array_record")
    if not os.path.exists(path):
        write_records(path, windows(stdlib_text(1_000_000), model.config.seq_len + 1))
    return Batches(records(path), cfg.global_batch, seed=cfg.seed)


def _train_loop(cfg, console, elastic, state, first, schedule, device_file, feed,
                save_report):
    """Steps `first`..`cfg.steps` with a progress bar, writing the device count the
    schedule grants and the report every 20 steps; `feed(i)`: step i's batch or the
    data source."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from meshscale.elastic.resources import FileSource

    columns = [TextColumn("step {task.completed}/{task.total}"), BarColumn(),
               TextColumn("{task.fields[info]}"), TimeElapsedColumn()]
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("train", total=cfg.steps, completed=first, info="")
        for i in range(first, cfg.steps):
            count = devices_at(schedule, i)
            if i > first and count != devices_at(schedule, i - 1):
                FileSource.write(device_file, count)
            state, metrics = elastic.step(state, feed(i))
            last = elastic.last_record  # the newest fetched loss: no wait on this step
            progress.update(task, completed=i + 1, info=(
                f"loss {last.loss if last else math.nan:.3f} "
                f"(step {last.step if last else '-'})  "
                f"{metrics['samples_per_second']:7.1f} samples/s  mesh {metrics['mesh']}"))
            if (i + 1) % 20 == 0:
                save_report()
    return state


def _event_printer(console, pending: dict, *, check_every: int | None = None):
    """`on_event` for the demo: try-run tables and decisions as they happen; a
    checkpoint event also writes the report (``pending["save"]``), so the record on disk
    is never behind the checkpoint."""
    from meshscale.app import report, terminal
    from meshscale.elastic import events

    def on_event(event: events.Event):
        if isinstance(event, events.Search):
            pending["search"] = event
            console.print(report.tryrun_table(report.to_plain(event.decision),
                                              title=terminal.search_title(event)))
            if event.decision.ruled_out:  # e.g. a --batch no data axis divides
                console.print(terminal.ruled_out_line(event.decision), markup=False,
                              highlight=False)
            if not event.decision.switch:
                console.print(report.decision_words(report.to_plain(event)))
        elif isinstance(event, events.Switch) and "search" in pending:
            console.print(report.decision_words(report.to_plain(pending.pop("search")),
                                                report.to_plain(event)))
        elif isinstance(event, events.Checkpoint) and "save" in pending:
            pending["save"]()
        elif isinstance(event, events.DevicesChanged | events.Resume):
            console.print(terminal.event_line(event, check_every=check_every))

    return on_event


def _finish(cfg: DemoConfig, console, model, state, out: dict) -> dict:
    """A text sample (gpt-tiny), report.png and the summary table at the end of a run."""
    import jax

    from meshscale.app import goodput_view, report
    from meshscale.model.contract import FunctionalModel

    if cfg.model == "gpt-tiny":
        from meshscale.models.gpt import sample

        fmodel, _ = FunctionalModel.of(model)
        trained = fmodel.merge(jax.device_get(state.params))
        out["sample"] = sample(trained, b"def ", 160, seed=cfg.seed).decode("utf-8", "replace")
        report.write_json(out, os.path.join(cfg.run_dir, "report.json"))
    png = report.plot(out, os.path.join(cfg.run_dir, "report.png"))
    console.print(report.summary_table(out))
    console.print(goodput_view.goodput_table(out["goodput"]))
    console.print(goodput_view.goodput_line(out["goodput"]), markup=False, highlight=False)
    if "sample" in out:
        console.print("[bold]sampled from the trained model:[/]\ndef " + out["sample"])
    console.print(f"report: {os.path.join(cfg.run_dir, 'report.json')}, {png}; metrics: "
                  f"{os.path.join(cfg.run_dir, 'metrics.jsonl')}, TensorBoard: tensorboard "
                  f"--logdir {os.path.join(cfg.run_dir, 'tensorboard')}", markup=False,
                  highlight=False, soft_wrap=True)
    return out


def elastic_trainer(cfg: DemoConfig, model, resources, *, on_event=None,
                    switching: SwitchPolicy | None = None):
    """The demo's `ElasticTrainer` for `cfg` (`switching`: replaces the demo's own policy,
    e.g. to inject measurements)."""
    import optax

    switching = switching or SwitchPolicy()
    return ElasticTrainer(
        Trainer(model, optax.adam(cfg.learning_rate), global_batch=cfg.global_batch,
                state_sharding=cfg.state_sharding),
        checkpoint_dir=os.path.join(cfg.run_dir, "checkpoints"), resources=resources,
        space=SearchSpace(p_min=cfg.p_min), timing=Timing(warmup=1, steps=3),
        switching=dataclasses.replace(switching, check_every=cfg.check_every,
                                      total_steps=cfg.steps),
        checkpoints=CheckpointPolicy(every=cfg.checkpoint_every, persistent_cache=False),
        metrics=MetricsPolicy(directory=cfg.run_dir), on_event=on_event)


# `DemoConfig` field -> `meshscale demo` flag (learning_rate has none)
FLAGS = {"steps": "--steps", "schedule": "--schedule", "devices": "--devices",
         "p_min": "--p-min", "model": "--model", "seed": "--seed", "global_batch": "--batch",
         "check_every": "--check-every", "checkpoint_every": "--checkpoint-every",
         "state_sharding": "--state-sharding"}


def resume_command(cfg: DemoConfig) -> str:
    """The `meshscale demo` command line that continues `cfg`'s run (its other flags)."""
    default = DemoConfig()
    words = ["meshscale", "demo", "--resume", "--run-dir", cfg.run_dir]
    for field, flag in FLAGS.items():
        if getattr(cfg, field) != getattr(default, field):
            words += [flag, str(getattr(cfg, field))]
    return shlex.join(words)


def _read_report(run_dir: str) -> dict | None:
    path = os.path.join(run_dir, "report.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        logging.getLogger(__name__).warning("cannot read %s (%s): starting its record anew",
                                            path, e)
        return None


def _same_run(previous: dict, cfg: DemoConfig, first: int) -> bool:
    """Whether `previous` (a report.json) records the run resumed at step `first`: the
    same model and global batch, and a checkpoint it saved (or an interrupt) at `first`.
    Otherwise its events are another run's and are not carried over (with a warning)."""
    config = previous.get("config", {})
    saved = {e.get("checkpoint_step") for e in previous.get("events", [])
             if e.get("event") == "checkpoint"}
    saved |= {e.get("step") for e in previous.get("events", []) if e.get("event") in
              ("interrupted", "restart")}
    why = (f"model {config.get('model')!r}, not {cfg.model!r}"
           if config.get("model") != cfg.model else
           f"global batch {config.get('global_batch')}, not {cfg.global_batch}"
           if config.get("global_batch") != cfg.global_batch else
           f"no checkpoint at step {first}, the one resumed" if first not in saved else None)
    if why is not None:
        logging.getLogger(__name__).warning(
            "%s records another run (%s): starting its record anew",
            os.path.join(cfg.run_dir, "report.json"), why)
    return why is None
