"""Several processes train one GPT on text files, each process reading only its rows.

    meshscale launch --processes 2 --devices-per-process 4 -- \\
        examples/multihost_files.py runs/files --steps 20
    meshscale launch --processes 4 --devices-per-process 2 -- \\
        examples/multihost_files.py runs/files --steps 40     # resumes at step 20
    python examples/multihost_files.py runs/one --steps 5     # one process, every device

The first run writes the stdlib's Python source as ArrayRecord shards in RUN/data (no
download). Every process then reads global batch `i` through `meshscale.data.Batches`:
grain shuffles the shards' records by seed, meshscale maps step `i` to records, and each
process reads only the rows its devices hold on the current mesh (prefetching the next
steps). The step in the checkpoint is the data position, so a restart on another process
count reads exactly the samples an uninterrupted run would. At the end every process
prints its rows on the last mesh and how many records it read. (A process holding
pipeline stages of every data replica, e.g. on an 8x1 mesh, reads every row: the batch is
replicated over the `pipe` axis.)
"""

from __future__ import annotations

import argparse
import os
import pathlib

SHARDS = 4


def write_shards(folder: pathlib.Path, seq_len: int) -> list[str]:
    """The text in SHARDS ArrayRecord files of seq_len + 1 byte records (once)."""
    from meshscale.models.text import stdlib_text, windows, write_records

    paths = [folder / f"text-{i:05d}-of-{SHARDS:05d}.array_record" for i in range(SHARDS)]
    if not all(p.exists() for p in paths):
        records = windows(stdlib_text(2_000_000), seq_len + 1)
        for i, path in enumerate(paths):
            write_records(path, records[i::SHARDS])
    return [str(p) for p in paths]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("run", help="run directory (checkpoints, data), shared by every host")
    parser.add_argument("--steps", type=int, default=40, help="train until this step")
    parser.add_argument("--batch", type=int, default=24, help="global batch")
    args = parser.parse_args(argv)

    from meshscale.runtime import distributed
    from meshscale.runtime.launch import ENV_COORDINATOR

    if os.environ.get(ENV_COORDINATOR):  # under `meshscale launch`
        distributed.initialize()
    import jax
    import optax
    from flax import nnx
    from jax.experimental import multihost_utils
    from meshscale.models.gpt import GPT, GPTConfig
    from meshscale.models.text import records

    from meshscale import CheckpointPolicy, ElasticTrainer, SearchSpace, Trainer
    from meshscale.data import Batches
    from meshscale.elastic import resources

    config = GPTConfig.preset("tiny")
    run = pathlib.Path(args.run)
    if distributed.is_main():
        write_shards(run / "data", config.seq_len)
    multihost_utils.sync_global_devices("data written")  # every process sees the files
    paths = write_shards(run / "data", config.seq_len)
    batches = Batches(records(paths), args.batch, seed=0)  # a grain MapDataset over shards
    elastic = ElasticTrainer(
        Trainer(GPT(config, rngs=nnx.Rngs(0)), optax.adam(3e-3), global_batch=args.batch),
        checkpoint_dir=run / "checkpoints", resources=resources.Static(jax.device_count()),
        space=SearchSpace(p_min=2), checkpoints=CheckpointPolicy(every=10))
    with elastic, batches:
        state = elastic.init(batches)  # the latest checkpoint, if any, on the best mesh
        first = int(state.step)
        for i in range(first, args.steps):
            state, metrics = elastic.step(state, batches)
            if distributed.is_main() and (i + 1) % 10 == 0:
                print(i + 1, float(metrics["loss"]), metrics["mesh"], flush=True)
    rows = elastic.trainer.local_rows(elastic.shape, elastic.devices)
    print(f"process {jax.process_index()} of {jax.process_count()}: steps {first}-"
          f"{args.steps} on {elastic.shape}, rows {rows.start}-{rows.stop} of {args.batch}; "
          f"read {batches.examples_read} records (prefetched steps included)", flush=True)


if __name__ == "__main__":
    main()
