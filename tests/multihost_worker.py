"""One process of a multi-process job in tests/test_multihost.py (under runtime.launch).

    python -m tests.multihost_worker job    OUT RUN   # steps, searches, an elastic run
    python -m tests.multihost_worker resume OUT RUN   # ElasticTrainer.init resumes, trains on
    python -m tests.multihost_worker preempt OUT RUN  # trains slowly until SIGTERM saves it
    python -m tests.multihost_worker finish OUT RUN   # resumes the preempted run to the end
    python -m tests.multihost_worker unclosed OUT RUN # TRAIN_STEPS, then exits without close

Each process writes ``OUT/<mode>-<process index>.json``; process 0 also writes the full
train state it checkpointed (job) or restored (resume) as ``OUT/<mode>-state.npz``.

The job ends with a fault: once everything is written, process 1 kills itself (SIGKILL)
in the middle of a step, leaving process 0 inside that step's collectives; the launcher
must stop the job. Its time of death is in ``OUT/killed-at``.
"""

from __future__ import annotations

import faulthandler
import functools
import json
import os
import sys
import time
from pathlib import Path

from meshscale.planning.space import SearchSpace
from meshscale.runtime import distributed
from meshscale.training.timing import Timing

BATCH = 24
SHAPES = ("2x4/m2", "4x2/m2")  # both span every process of 2 x 4 and 4 x 2 devices
STEPS = 3  # per mesh, plain Trainer
TRAIN_STEPS, SAVED_STEP = 5, 3  # the elastic run checkpoints at step 3, goes on to step 5
SEARCH = {"timing": Timing(warmup=1, steps=1),
          "space": SearchSpace(p_min=2, max_pipe=4, microbatches=[2])}
CANDIDATES = ("2x4/m2", "3x2/m2", "4x2/m2")  # SEARCH's space on 8 devices
START = time.perf_counter()


def say(what: str) -> None:
    """A progress line from process 0 (shown when a test fails)."""
    if distributed.is_main():
        print(f"{time.perf_counter() - START:6.1f}s {what}", flush=True)


@functools.cache
def host_batches(n: int) -> list[dict]:
    """The test suite's batches (seed i for step i), as host arrays (do not modify)."""
    import numpy as np

    from tests.helpers import make_model

    model = make_model("mlp")
    return [{k: np.asarray(v) for k, v in model.example_batch(BATCH, seed=i).items()}
            for i in range(n)]


def gather(tree) -> dict:
    """Every leaf of `tree` as one host array, keyed by its path (a collective)."""
    import jax
    from jax.experimental import multihost_utils

    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    values = multihost_utils.process_allgather([x for _, x in leaves], tiled=True)
    return {jax.tree_util.keystr(p): v for (p, _), v in zip(leaves, values, strict=True)}


def write(out: Path, mode: str, result: dict, state: dict | None = None) -> None:
    """This process's result; the gathered `state` from process 0."""
    import jax
    import numpy as np

    (out / f"{mode}-{jax.process_index()}.json").write_text(json.dumps(result))
    if state is not None and distributed.is_main():
        np.savez(out / f"{mode}-state.npz", **state)


def plain_steps(trainer) -> tuple:
    """Losses of STEPS plain Trainer steps on each of SHAPES, and this process's rows."""
    from meshscale import MeshShape

    losses, rows = {}, {}
    for text, shape in ((t, MeshShape.parse(t)) for t in SHAPES):
        state, step = trainer.init_state(shape), trainer.compile_step(shape)
        local = trainer.local_rows(shape)
        rows[text], losses[text] = [local.start, local.stop], []
        for i, batch in enumerate(host_batches(TRAIN_STEPS)[:STEPS]):
            if i % 2:  # odd steps: only this process's rows, as a sharded loader gives them
                batch = {k: v[local] for k, v in batch.items()}
            state, metrics = step(state, trainer.put_batch(batch, shape))
            losses[text].append(float(metrics["loss"]))
    return losses, rows, state


def searches(trainer, state) -> tuple:
    """A search with real try-runs, and one whose measurements differ per process."""
    import jax

    from meshscale import search
    from meshscale.planning.tryrun import TryRunResult

    batches = host_batches(TRAIN_STEPS)[:2]
    measured = search(trainer, state, batches, jax.devices(), **SEARCH)

    def disagreeing(candidate):
        """Process 0 finds deep pipelines fast, the others shallow ones."""
        pipe = candidate.shape.pipe
        speed = 100.0 * (pipe if distributed.is_main() else 1.0 / pipe)
        return TryRunResult(candidate.shape, candidate.kind, "ok", step_seconds=BATCH / speed,
                            samples_per_second=speed, num_devices=candidate.shape.num_devices)

    injected = search(trainer, state, batches, jax.devices(), measure=disagreeing,
                      **SEARCH)
    return measured, injected, one_sided_failure(trainer, state, batches)


def one_sided_failure(trainer, state, batches):
    """Real try-runs where placing the 4x2 copy fails on process 1 only: its peer must not
    step into that candidate's collectives alone (it would wait forever)."""
    import jax

    from meshscale import search
    from meshscale.planning import tryrun

    place = tryrun.copy_state

    def failing(trainer, state, shape, devices):
        if shape.pipe == 4 and jax.process_index() == 1:
            raise MemoryError("simulated: no room for the try-run's copy")
        return place(trainer, state, shape, devices)

    tryrun.copy_state = failing
    try:
        return search(trainer, state, batches, jax.devices(), **SEARCH)
    finally:
        tryrun.copy_state = place


def damaged_on_one_process(trainer, state, run: Path) -> dict:
    """Steps 1 and 2 saved; step 2 unreadable for process 1 only (as a stale NFS cache
    shows it): both processes must restore step 1."""
    import jax

    from meshscale import Checkpointer, MeshShape
    from meshscale.store import checkpoint

    with Checkpointer(run / "damaged", trainer) as ckpt:
        ckpt.save(state, step=1)
        ckpt.save(state, step=2)
        ckpt.wait()
        read = checkpoint.readable_metadata  # a step's metadata, as restore reads it

        def stale(directory, step, *args):
            if step == 2 and jax.process_index() == 1:
                raise FileNotFoundError("simulated: step 2 not visible on this host yet")
            return read(directory, step, *args)

        checkpoint.readable_metadata = stale
        try:
            restored = ckpt.restore(MeshShape.parse(SHAPES[-1]))  # the plain steps' last mesh
        finally:
            checkpoint.readable_metadata = read
        expected, got = gather(state.params), gather(restored.params)
        return {"restored_step": ckpt.last_fallback.restored_step,
                "skipped": [s for s, _ in ckpt.last_fallback.skipped],
                "equal": all(bool((expected[k] == got[k]).all()) for k in expected)}


def elastic_trainer(run: Path, source, trainer=None, *, measure=None):
    """An elastic run in `run` over SEARCH's space and timing (p_min 2), sharing
    `trainer`'s optimizer and compiled steps when given; `measure`: injected try-runs."""
    from meshscale import CheckpointPolicy, SwitchPolicy, Trainer
    from meshscale.elastic.trainer import ElasticTrainer
    from tests.helpers import make_model, make_optimizer

    return ElasticTrainer(
        Trainer(make_model("mlp"), trainer.optimizer if trainer else make_optimizer(),
                global_batch=BATCH, cache=trainer.cache if trainer else None),
        checkpoint_dir=run, resources=source, **SEARCH,
        switching=SwitchPolicy(check_every=100, measure=measure),
        checkpoints=CheckpointPolicy(every=SAVED_STEP, persistent_cache=False))


def job(out: Path, run: Path) -> None:
    """Plain steps on meshes spanning the processes, two searches, then an elastic run of
    TRAIN_STEPS that checkpoints the state at SAVED_STEP and then loses two devices."""
    from meshscale import Trainer
    from meshscale.app.report import to_plain
    from meshscale.elastic import resources
    from tests.helpers import make_model, make_optimizer

    trainer = Trainer(make_model("mlp"), make_optimizer(), global_batch=BATCH)
    say("model built")
    losses, rows, state = plain_steps(trainer)
    say("plain steps done")
    measured, injected, one_sided = searches(trainer, state)
    say("searches done")
    damaged = damaged_on_one_process(trainer, state, run)
    say("damaged-step restore done")
    # The scheduler grants 8 devices, then 6 after the checkpoint at SAVED_STEP; only
    # process 0's answer counts (the others' sources say 8 all along).
    granted = {"count": 8}
    source = resources.Callback(lambda: granted["count"] if distributed.is_main() else 8)
    # Shares the compiled steps; measured deterministically (2x4 on 8 devices, so that the
    # change to 6 forces a switch), the real try-runs having been checked just above.
    elastic = elastic_trainer(run, source, trainer, measure=most_replicas)
    batches = host_batches(TRAIN_STEPS)
    state = elastic.init(batches[0])
    say(f"elastic run on {elastic.shape}")
    elastic_losses, saved = [], None
    for i in range(TRAIN_STEPS):
        state, metrics = elastic.step(state, batches[i])
        elastic_losses.append(float(metrics["loss"]))
        if int(state.step) == SAVED_STEP:
            saved = gather(state)  # as checkpointed, before the next step donates it
            granted["count"] = 6
            state = elastic.check(state, batches[i])  # as check_every would
            say(f"after the device change: {elastic.shape}")
    events = [{k: v for k, v in e.items() if k in ("event", "after", "reason", "num_devices")}
              for e in elastic.history]
    elastic.wait()  # every checkpoint on disk
    write(out, "job", {"losses": losses, "local_rows": rows, "measured": to_plain(measured),
                       "injected": to_plain(injected), "one_sided": to_plain(one_sided),
                       "damaged": damaged, "elastic_losses": elastic_losses,
                       "mesh": str(elastic.shape), "events": to_plain(events)}, saved)
    killed_mid_step(out, trainer, elastic, state, batches[0])


def killed_mid_step(out: Path, trainer, elastic, state, batch) -> None:
    """Dispatch one more step; process 1 dies (SIGKILL) while it runs, process 0 waits
    for it forever (its collectives have lost their peer) until the launcher stops it."""
    import signal

    import jax

    step = trainer.compile_step(elastic.shape, elastic.devices)
    _, metrics = step(state, trainer.put_batch(batch, elastic.shape, elastic.devices))
    if jax.process_index() == 1:
        (out / "killed-at").write_text(repr(time.time()))
        os.kill(os.getpid(), signal.SIGKILL)
    jax.block_until_ready(metrics)
    say("process 0 finished a step its peer never ran")  # never reached


def most_replicas(candidate):
    """A deterministic measurement for restarts: more data replicas are faster."""
    from meshscale.planning.tryrun import TryRunResult

    speed = 100.0 * candidate.shape.data
    return TryRunResult(candidate.shape, candidate.kind, "ok", step_seconds=BATCH / speed,
                        samples_per_second=speed, num_devices=candidate.shape.num_devices)


def resume(out: Path, run: Path) -> None:
    """A new job (another process count) resumes from the checkpoint and trains on."""
    import jax

    from meshscale.elastic import resources

    batches = host_batches(TRAIN_STEPS)
    elastic = elastic_trainer(run, resources.Static(jax.device_count()), measure=most_replicas)
    say("model built")
    state = elastic.init(batches[0])
    first = int(state.step)
    say(f"resumed at step {first} on {elastic.shape}")
    restored = gather(state)
    losses = []
    for i in range(first, TRAIN_STEPS):
        state, metrics = elastic.step(state, batches[i])
        losses.append(float(metrics["loss"]))
    write(out, "resume", {"first_step": first, "losses": losses, "mesh": str(elastic.shape),
                          "processes": jax.process_count(), "devices": jax.device_count()},
          restored)


PREEMPT_END = 12  # the preempted run's last step (it is stopped well before)


def preempt(out: Path, run: Path) -> None:
    """Resume RUN and train slowly (the test's SIGTERM must arrive mid-run); after its
    first step process 0 writes OUT/training. The launcher passes the SIGTERM on to every
    process, JAX's preemption service picks one step for all, the trainer saves it and
    raises Interrupted (exit status 143); each process first writes what it trained."""
    import jax

    from meshscale.elastic import resources
    from meshscale.errors import Interrupted

    batches = host_batches(PREEMPT_END)
    elastic = elastic_trainer(run, resources.Static(jax.device_count()), measure=most_replicas)
    state = elastic.init(batches[0])
    first, losses = int(state.step), []
    try:
        for i in range(first, PREEMPT_END):
            state, metrics = elastic.step(state, batches[i])
            losses.append(float(metrics["loss"]))
            if i == first and distributed.is_main():
                (out / "training").write_text("training")
            time.sleep(0.5)
    except Interrupted as stop:
        write(out, "preempt", {"first_step": first, "losses": losses, "saved": stop.step,
                               "code": stop.code})
        raise
    write(out, "preempt", {"first_step": first, "losses": losses, "saved": None, "code": 0})


def unclosed(out: Path, run: Path) -> None:
    """TRAIN_STEPS steps (a checkpoint at SAVED_STEP only), then return without
    `close()`: the exit hook of every process saves the last step together."""
    import jax

    from meshscale.elastic import resources

    batches = host_batches(TRAIN_STEPS)
    elastic = elastic_trainer(run, resources.Static(jax.device_count()), measure=most_replicas)
    state = elastic.init(batches[0])
    for i in range(TRAIN_STEPS):
        state, _ = elastic.step(state, batches[i])
    write(out, "unclosed", {"steps": TRAIN_STEPS})


def finish(out: Path, run: Path) -> None:
    """Resume the preempted run (another process count) and train to PREEMPT_END."""
    import jax

    from meshscale.elastic import resources

    batches = host_batches(PREEMPT_END)
    with elastic_trainer(run, resources.Static(jax.device_count()),
                         measure=most_replicas) as elastic:
        state = elastic.init(batches[0])
        first, losses = int(state.step), []
        for i in range(first, PREEMPT_END):
            state, metrics = elastic.step(state, batches[i])
            losses.append(float(metrics["loss"]))
    write(out, "finish", {"first_step": first, "losses": losses})


def main(argv: list[str]) -> None:
    # A process stuck (say, in a collective a peer never joins) prints every thread's
    # stack and exits, so the launcher stops the rest and the test shows where.
    faulthandler.dump_traceback_later(float(os.environ.get("WORKER_HANG_SECONDS", 180)),
                                      exit=True)
    distributed.initialize()
    say(f"{argv[0]}: process 0 of {__import__('jax').process_count()} started")
    mode, out, run = argv
    modes = {"job": job, "resume": resume, "preempt": preempt, "finish": finish,
             "unclosed": unclosed}
    modes[mode](Path(out), Path(run))


if __name__ == "__main__":
    main(sys.argv[1:])
