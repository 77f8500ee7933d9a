"""One attempt of an elastic run, for tests/test_metrics.py (run as a child process).

``python -m tests.goodput_worker CHECKPOINT_DIR STEPS [CRASH_AFTER]``: trains the test MLP
with 4 devices, then 8 from step 8 (a switch decided by injected measurements), every
timing window of 4 steps, a checkpoint every 5 steps. With CRASH_AFTER it dies by
SIGKILL after that step (once its window's metrics are written), as a preempted host
does; without it, it closes and prints the run's totals as one JSON line.
"""

import json
import os
import signal
import sys
import time

# 8 devices, keeping the fast-compile flags it inherits from the suite (tests/conftest.py)
COUNT = "--xla_force_host_platform_device_count"
FLAGS = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(COUNT)]
os.environ["XLA_FLAGS"] = " ".join([*FLAGS, f"{COUNT}=8"])

import meshscale as ms  # noqa: E402
from meshscale.elastic import resources  # noqa: E402
from tests.helpers import make_model, make_optimizer, prefer_more_devices  # noqa: E402

BATCH = 16


def main(directory: str, steps: int, crash_after: int | None) -> None:
    model = make_model("mlp")
    step = {"now": 0}
    elastic = ms.ElasticTrainer(
        ms.Trainer(model, make_optimizer(), global_batch=BATCH), checkpoint_dir=directory,
        resources=resources.Callback(lambda: 4 if step["now"] < 8 else 8),
        space=ms.SearchSpace(p_min=2), timing=ms.Timing(warmup=1, steps=1, window=4),
        switching=ms.SwitchPolicy(check_every=4, measure=prefer_more_devices,
                                  precompile="off"),
        checkpoints=ms.CheckpointPolicy(every=5, handle_signals=False))
    state = elastic.init(model.example_batch(BATCH, seed=0))
    for i in range(int(state.step), steps):
        step["now"] = i
        state, _ = elastic.step(state, model.example_batch(BATCH, seed=i))
        if crash_after is not None and i + 1 == crash_after:
            elastic.flush()  # the window closes: its line is queued
            time.sleep(3.0)  # ... written by the metrics thread, TensorBoard's flushed
            os.kill(os.getpid(), signal.SIGKILL)
    elastic.close()
    totals = elastic.totals
    print(json.dumps({"goodput": totals.goodput, "events": [
        {"event": e.kind, "seconds": getattr(e, "seconds", None)} for e in elastic.history]}),
        flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else None)
