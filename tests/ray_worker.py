"""The training loop of tests/test_ray.py, run by every Ray Train worker of every attempt.

It is an ordinary meshscale loop (it would run the same as a plain process): an
`ElasticTrainer` in ``config["checkpoint_dir"]`` sized by ``jax.device_count()``. For the
test it also
- waits before each step until the test allows it (``OUT/allow``: the last step that may
  train), so that nodes are added, removed and workers killed at known steps;
- appends what happened to ``OUT/progress.jsonl`` (process 0: events and losses), with
  the Ray demo's own recorder, and writes each worker's pid to ``OUT/pids/<attempt>-<rank>``.
Batches are a pure function of the step index, so a step trained twice gives one loss.
"""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path

IMPORTED = time.time()  # in a worker: when Ray handed it this attempt's function
BATCH = 24
P_MIN = 2
CHECKPOINT_EVERY = 3


@functools.cache
def host_batch(i: int) -> dict:
    """Batch i (seed i), as host arrays."""
    import numpy as np

    return {k: np.asarray(v) for k, v in batch_model().example_batch(BATCH, seed=i).items()}


@functools.cache
def batch_model():
    """One model makes every batch (example_batch reads only the config and the seed): a
    model per batch cost each Ray worker of each attempt 1.5 s of CPU."""
    from tests.helpers import make_model

    return make_model("mlp")


def loop(config: dict) -> None:
    import jax

    import meshscale as ms
    from meshscale.app.ray_demo import ProgressLog, wait_until_allowed
    from meshscale.elastic import resources
    from meshscale.integrations import ray as meshscale_ray
    from tests.helpers import make_model, make_optimizer, prefer_more_devices

    out = Path(config["out"])
    record = ProgressLog(out)  # process 0's pid names this attempt
    (out / "pids").mkdir(exist_ok=True)
    (out / "pids" / f"{record.attempt}-{jax.process_index()}").write_text(str(os.getpid()))

    def on_event(event):
        if event["event"] in ("resume", "start", "checkpoint", "switch"):
            record(event=event["event"], **{k: event.get(k) for k in (
                "checkpoint_step", "after", "num_devices", "reason") if k in event})

    record(event="joined", imported=IMPORTED, time=time.time())
    elastic = ms.ElasticTrainer(
        ms.Trainer(make_model("mlp"), make_optimizer(), global_batch=BATCH),
        checkpoint_dir=config["checkpoint_dir"], resources=resources.Static(jax.device_count()),
        space=ms.SearchSpace(p_min=config.get("p_min", P_MIN), microbatches=[2]),
        timing=ms.Timing(warmup=1, steps=1, window=2),  # a few steps still measure samples/s
        switching=ms.SwitchPolicy(check_every=1000, precompile="off",
                                  measure=prefer_more_devices),
        checkpoints=ms.CheckpointPolicy(every=CHECKPOINT_EVERY), on_event=on_event)
    state = elastic.init(host_batch(0))
    for i in range(int(state.step), config["steps"]):
        with elastic.ledger.spend("idle"):  # the test holds the step back: not training
            wait_until_allowed(out, i)
        state, metrics = elastic.step(state, host_batch(i))
        sent = meshscale_ray.report(elastic, metrics, step=i + 1)
        record(event="step", step=i + 1, loss=sent["loss"], mesh=sent["mesh"], time=time.time())
    elastic.close()  # the last step saved, the metrics closed

