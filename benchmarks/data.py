"""Does input stall a step? The grain data path against pre-materialised batches.

Two models, each trained by two `ElasticTrainer` loops on the same 2x1/m2 mesh, the loops
taking turns round by round (`benchmarks.common.interleaved`), every round `--steps`
steps ended by one block:

1. materialised: every global batch built beforehand (host arrays in a list);
2. pipeline: ``elastic.step(state, batches)`` with `meshscale.data.Batches` reading an
   ArrayRecord file (written here from the stdlib's text), shuffled by grain, prefetching
   the next 2 steps' rows in background threads.

GPT tiny reads fixed windows; Llama tiny reads documents packed into rows with segment
ids (`meshscale.data.pack_documents`). Target: time the step waited for data / step time
<= 2% with prefetch on (`Batches.wait_seconds` over the pipeline's rounds); the ratio of
the pipeline's round time to the materialised one's is printed beside it.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

from benchmarks.common import interleaved, ratio, ratio_text, simulate_devices, table

simulate_devices(8)

import jax  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from meshscale.models.gpt import GPT, GPTConfig  # noqa: E402
from meshscale.models.llama import Llama, LlamaConfig  # noqa: E402
from meshscale.models.text import (  # noqa: E402
    documents,
    records,
    stdlib_text,
    windows,
    write_records,
)

from meshscale import (  # noqa: E402
    CheckpointPolicy,
    CompileCache,
    SearchSpace,
    Timing,
    Trainer,
    resources,  # noqa: E402
)
from meshscale.data import Batches, pack_documents  # noqa: E402
from meshscale.elastic.trainer import ElasticTrainer  # noqa: E402

SPACE = SearchSpace(p_min=2, max_pipe=2, microbatches=[2])
PREFETCH = (2, 10)  # the default; the loop's timing window (how far the host runs ahead)


def datasets(folder: str, gpt: GPTConfig, llama: LlamaConfig, text: bytes) -> dict:
    """The two models' grain datasets, read from ArrayRecord files in `folder`."""
    gpt_file = write_records(f"{folder}/windows.array_record", windows(text, gpt.seq_len + 1))
    docs_file = write_records(f"{folder}/documents.array_record", documents(text))
    packed = pack_documents(records(docs_file), llama.seq_len + 1, documents_per_row=2)
    return {"GPT tiny": records(gpt_file), "Llama tiny, packed": packed}


def measure(name, model, dataset, args, folder) -> list:
    """Rows of the table for one model: each prefetch depth against materialised batches."""
    cache, optimizer = CompileCache(), optax.adam(1e-3)
    sources = {f"pipeline, prefetch {d}": Batches(dataset, args.batch, seed=0, prefetch=d)
               for d in PREFETCH}
    spec = next(iter(sources.values())).spec()

    def elastic(run: str) -> ElasticTrainer:
        return ElasticTrainer(
            Trainer(model, optimizer, global_batch=args.batch, example_batch=spec,
                    cache=cache),
            checkpoint_dir=f"{folder}/{name}-{run}", resources=resources.Static(2),
            space=SPACE, timing=Timing(warmup=1, steps=1),
            checkpoints=CheckpointPolicy(every=None, persistent_cache=False))

    first = next(iter(sources.values()))
    ready = [first.batch(i) for i in range(args.steps)]  # the same rows, built beforehand
    loops = {run: elastic(str(n)) for n, run in enumerate(["materialised", *sources])}
    states = {run: loop.init(sources.get(run, ready[0])) for run, loop in loops.items()}
    waited: dict[str, list[float]] = {run: [] for run in sources}

    def runner(run: str):
        def go():
            data, state, metrics = sources.get(run), states[run], None
            before = data.wait_seconds if data else 0.0
            for i in range(args.steps):
                state, metrics = loops[run].step(state, data or ready[i])
            states[run] = state
            jax.block_until_ready(metrics["loss"])
            if data:
                waited[run].append(data.wait_seconds - before)
        return go

    times = interleaved({run: runner(run) for run in loops}, rounds=args.rounds)
    for thing in [*loops.values(), *sources.values()]:
        thing.close()
    rows = []
    for run in sources:
        fraction = [w / t for w, t in zip(waited[run][-args.rounds:], times[run], strict=True)]
        share = statistics.median(fraction)
        rows.append([name, run, statistics.median(times[run]) / args.steps * 1e3,
                     f"{share:.2%} (max {max(fraction):.2%})", "<= 2%", str(share <= 0.02),
                     ratio_text(ratio(times[run], times["materialised"]))])
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20, help="steps per round")
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args(argv)
    gpt, llama = GPTConfig.preset("tiny"), LlamaConfig.preset("tiny")
    with tempfile.TemporaryDirectory(prefix="meshscale-bench-data-") as folder:
        found = datasets(folder, gpt, llama, stdlib_text(2_000_000))
        models = {"GPT tiny": GPT(gpt, rngs=nnx.Rngs(0)),
                  "Llama tiny, packed": Llama(llama, rngs=nnx.Rngs(0))}
        rows = [row for name in models
                for row in measure(name, models[name], found[name], args, folder)]
    print(f"global batch {args.batch}, mesh 2x1/m2 on 2 simulated "
          f"{jax.devices()[0].platform} devices, jax {jax.__version__}; {args.rounds} "
          f"interleaved rounds of {args.steps} steps\n")
    print(table(["model", "loop", "median ms/step", "waiting for data / step time",
                 "target", "met", "pipeline / materialised (median, min, max)"], rows))


if __name__ == "__main__":
    main()
