"""One process of a job in tests/test_data.py: an elastic run that reads its text through
`meshscale.data.Batches` from an ArrayRecord file (under `meshscale launch`).

    python -m tests.data_worker train  OUT RUN  # steps 0..SAVED, 8 -> 6 devices at CHANGE
    python -m tests.data_worker resume OUT RUN  # resumes RUN (another process count) to END

Each process writes ``OUT/<mode>-<process index>.json``: the losses, every read the loop
made (step, rows, the rows' tokens), the raw record bytes this process read from the file
over steady steps, and its rows on each mesh.
"""

from __future__ import annotations

import faulthandler
import json
import os
import sys
import time
from pathlib import Path

BATCH, SEED, LENGTH = 24, 7, 17  # LENGTH: bytes a record, the model's seq_len + 1
CHANGE, SAVED, END = 3, 6, 9  # the device change, the train job's last step, the end
RECORDS = 240  # windows of LENGTH bytes: 10 steps an epoch
MEASURE = (0, 2)  # the bytes a process read are counted after these steps (of a job)


class CountingSource:
    """A random-access source that counts the raw bytes read from it (thread-safe)."""

    def __init__(self, source):
        import threading

        self.source, self.bytes, self._lock = source, 0, threading.Lock()

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index):
        record = self.source[index]
        with self._lock:
            self.bytes += len(record)
        return record


START = time.perf_counter()


def say(what: str) -> None:
    """A progress line from process 0 (shown when a test fails)."""
    import jax

    if jax.process_index() == 0:
        print(f"{time.perf_counter() - START:6.1f}s {what}", flush=True)


def write_text(path: Path) -> Path:
    """RECORDS windows of the stdlib's text as an ArrayRecord file (no download)."""
    from meshscale.models.text import stdlib_text, windows, write_records

    from tests.helpers import TEST_GPT

    length = TEST_GPT.seq_len + 1
    return write_records(path, windows(stdlib_text(RECORDS * length), length))


def batches(path: Path, *, prefetch: int = 2):
    """(Batches over the file at `path`, its CountingSource); every read is logged."""
    import grain
    import numpy as np

    from meshscale.data import Batches

    source = CountingSource(grain.sources.ArrayRecordDataSource(str(path)))
    dataset = grain.MapDataset.source(source).map(
        lambda r: {"tokens": np.frombuffer(r, np.uint8).astype(np.int32)})

    class Logged(Batches):
        def rows(self, step, rows=slice(None)):
            out = super().rows(step, rows)
            start, stop, _ = rows.indices(self.global_batch)
            self.reads.append([int(step), start, stop, out["tokens"].tolist()])
            return out

    logged = Logged(dataset, BATCH, seed=SEED, prefetch=prefetch)
    logged.reads = []
    return logged, source


def model():
    """A 2-layer GPT over bytes (p_min 2: one layer a stage): cheap to compile."""
    from flax import nnx
    from meshscale.models.gpt import GPT, GPTConfig

    return GPT(GPTConfig(seq_len=LENGTH - 1, num_layers=2, d_model=16, num_heads=2),
               rngs=nnx.Rngs(0))


def elastic_trainer(run: Path, source):
    """A GPT run over p_min 2 (try-runs measured: more data replicas are faster)."""
    from meshscale import CheckpointPolicy, SearchSpace, SwitchPolicy, Timing, Trainer
    from meshscale.elastic.trainer import ElasticTrainer
    from tests.helpers import make_optimizer
    from tests.multihost_worker import most_replicas

    return ElasticTrainer(
        Trainer(model(), make_optimizer(), global_batch=BATCH), checkpoint_dir=run,
        resources=source, space=SearchSpace(p_min=2, max_pipe=4, microbatches=[2]),
        timing=Timing(warmup=1, steps=1),
        switching=SwitchPolicy(check_every=100, measure=most_replicas),
        checkpoints=CheckpointPolicy(every=SAVED, persistent_cache=False))


def train(out: Path, run: Path, first_end: tuple[int, int]) -> None:
    """Steps until `first_end[1]` through the source; at CHANGE (a first run only)
    process 0's poll drops to 6 devices. Writes what this process read."""
    import jax

    from meshscale.elastic import resources
    from meshscale.runtime import distributed

    data, counted = batches(out / "text.array_record")
    granted = {"count": jax.device_count()}
    source = resources.Callback(lambda: granted["count"] if distributed.is_main() else 8)
    losses, rows, measured = [], {}, {}
    with elastic_trainer(run, source) as elastic, data:
        say("trainer built")
        state = elastic.init(data)
        first = int(state.step)
        say(f"started at step {first} on {elastic.shape}")
        for i in range(first, first_end[1]):
            state, metrics = elastic.step(state, data)
            if i - first in MEASURE:  # the prefetch window slid by the steps in between
                data.wait()
                measured[i - first] = counted.bytes
            rows[metrics["mesh"]] = data.reads[-1][1:3]  # the step's own read
            losses.append(float(metrics["loss"]))
            if i + 1 == CHANGE and first == 0:
                granted["count"] = 6
                state = elastic.check(state, data)  # as check_every would
                say(f"after the device change: {elastic.shape}")
        mesh = str(elastic.shape)
        say("steps done")
    steady = (measured[MEASURE[1]] - measured[MEASURE[0]]) / (MEASURE[1] - MEASURE[0])
    result = {"first": first, "losses": losses, "reads": data.reads, "rows": rows,
              "mesh": mesh, "bytes_per_step": steady, "processes": jax.process_count()}
    (out / f"{run.name}-{jax.process_index()}.json").write_text(json.dumps(result))


def main(argv: list[str]) -> None:
    faulthandler.dump_traceback_later(float(os.environ.get("WORKER_HANG_SECONDS", 180)),
                                      exit=True)
    from meshscale.runtime import distributed

    distributed.initialize()
    mode, out, run = argv
    start = time.perf_counter()
    train(Path(out), Path(run), (0, SAVED) if mode == "train" else (SAVED, END))
    if distributed.is_main():
        print(f"{mode}: {time.perf_counter() - start:.1f}s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
