"""Search cost and quality: GPT tiny on 8 simulated devices, p_min = 2, measured in one run.

1. First search (nothing compiled): total seconds, sum of compile seconds and their ratio
   (target: search <= 1.3 x compile time: the try-runs' own steps cost little).
2. The same search again (every executable cached): second / first seconds (target
   <= 0.3), and the compile count of the second (must be 0).
3. Regret: every valid pipe x data x microbatches shape (not only the widest data axis,
   not only the default microbatch count) try-run with 5x longer timing, in 5 rounds
   over all shapes (median of the rounds), so load that drifts during the long run falls
   on every shape alike; the first
   search's chosen shape's samples/s there over the best samples/s there (target >= 0.95),
   both over the rule's space (widest data per pipe, every microbatch choice) and over
   every valid shape.
4. Awkward device counts (the vertical path): a 32-layer GPT (the tiny preset's width)
   searched from scratch on 6 and on 7 devices, p_min 2: every candidate's try-run and
   the decision, and how many of the devices the chosen mesh uses. Before uneven stages
   only pipe widths dividing 32 were valid (2x3 and 4x1 on 6 devices; 2x1 and 4x1 on 7).
Simulated devices share this machine's cores: the ratios are the figures to read. They
also invert one fact of real hardware: fewer simulated devices do less synchronisation
on the same cores, so a narrower data axis can win, which the rule never tries.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import statistics
import sys
import tempfile
import time

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks.common import simulate_devices, table  # noqa: E402

simulate_devices(8)

import jax  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from meshscale.models.gpt import GPT, GPTConfig  # noqa: E402
from meshscale.models.text import ByteBatches, stdlib_text  # noqa: E402

from meshscale import Candidate, MeshShape, Trainer, search, try_run  # noqa: E402
from meshscale.planning.cost import Workload  # noqa: E402
from meshscale.planning.space import candidates, microbatch_choices  # noqa: E402


def every_shape(n: int, *, p_min: int, num_layers: int, global_batch: int) -> list[MeshShape]:
    """All valid shapes on n devices: any data axis, every microbatch choice (near p, 2p,
    4p), every pipe width up to the layer count."""
    return [MeshShape(p, d, m)
            for p in range(p_min, min(n, num_layers) + 1)
            for d in range(1, n // p + 1) if global_batch % d == 0
            for m in microbatch_choices(p, global_batch // d)]


def rows(decision) -> list[list]:
    return [[str(r.shape), r.kind, r.compile_origin, r.compile_seconds, r.step_seconds,
             r.samples_per_second, r.status] for r in decision.results]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--p-min", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--longer", type=int, default=5, help="exhaustive timing factor")
    parser.add_argument("--quick", action="store_true",
                        help="parts 1-2 only (search cost), no exhaustive regret")
    args = parser.parse_args(argv)

    devices = jax.devices()
    model = GPT(GPTConfig.preset("tiny"), rngs=nnx.Rngs(0))
    trainer = Trainer(model, optax.adam(1e-3), global_batch=args.batch)
    data = ByteBatches(stdlib_text(1_000_000), seq_len=model.config.seq_len,
                       batch_size=args.batch, seed=0)
    batches = [data.batch(i) for i in range(args.warmup + args.steps)]
    state = trainer.init_state(MeshShape(args.p_min, 1, args.p_min), devices)
    options = dict(p_min=args.p_min, warmup=args.warmup, steps=args.steps)

    with tempfile.TemporaryDirectory() as run_dir:
        start = time.perf_counter()
        first = search(trainer, state, batches, devices, compile_cache_dir=run_dir, **options)
        first_s = time.perf_counter() - start
        compiles = trainer.cache.compiles
        start = time.perf_counter()
        second = search(trainer, state, batches, devices, **options)
        second_s = time.perf_counter() - start
        recompiles = trainer.cache.compiles - compiles

        if args.quick:
            start = time.perf_counter()  # what the first search spent on its cost model
            Workload.from_trainer(Trainer(model, optax.adam(1e-3), global_batch=args.batch))
            print(cost_figures(first, second, first_s, second_s, recompiles) + "\n\n" + table(
                ["cost model (3 one-example compiles, in the first search) s"],
                [[time.perf_counter() - start]]))
            return
        shapes = every_shape(len(devices), p_min=args.p_min, num_layers=trainer.num_layers,
                             global_batch=args.batch)
        rounds: dict[MeshShape, list] = {s: [] for s in shapes}
        for i in range(args.longer):
            for s in shapes:
                r = try_run(trainer, state, batches, Candidate(s, "exhaustive"), devices,
                            warmup=args.warmup if i == 0 else 1, steps=args.steps)
                rounds[s].append(r)
                print(f"round {i} {s}: {r.samples_per_second:.1f} samples/s", file=sys.stderr,
                      flush=True)

    ran = {s: statistics.median(r.samples_per_second for r in rs)
           for s, rs in rounds.items() if all(r.ok for r in rs)}
    rule = {c.shape for c in candidates(len(devices), p_min=args.p_min,
                                        num_layers=trainer.num_layers,
                                        global_batch=args.batch, microbatches="all")}
    best_shape = max(ran, key=ran.get)
    best_rule = max((s for s in ran if s in rule), key=ran.get)
    chosen = first.best.shape
    regret = ran.get(chosen, 0.0) / ran[best_shape]
    regret_rule = ran.get(chosen, 0.0) / ran[best_rule]

    print(f"GPT tiny, global batch {args.batch}, {len(devices)} simulated devices, "
          f"p_min {args.p_min}, try-runs of {args.warmup} + {args.steps} steps; exhaustive: "
          f"{len(shapes)} shapes x {args.longer} rounds of {args.steps} timed steps.\n")
    headers = ["mesh", "kind", "compile", "compile s", "step s", "samples/s", "status"]
    print("First search:\n\n" + table(headers, rows(first)) + "\n")
    print("Second search:\n\n" + table(headers, rows(second)) + "\n")
    print("Exhaustive (chosen: " + str(chosen) + "):\n\n" + table(
        ["mesh", "in rule's space", "samples/s (median of rounds)", "min", "max", "status"],
        [[str(s), s in rule, ran.get(s, 0.0), min(r.samples_per_second for r in rs),
          max(r.samples_per_second for r in rs), rs[0].status]
         for s, rs in rounds.items()]) + "\n")
    figures = cost_rows(first, second, first_s, second_s, recompiles) + [
        [f"regret, rule's space: chosen {chosen} / best {best_rule}", regret_rule,
         ">= 0.95", regret_rule >= 0.95],
        [f"regret, every shape: chosen {chosen} / best {best_shape}", regret, ">= 0.95",
         regret >= 0.95],
    ]
    print(table(["figure", "value", "target", "met"], figures))
    print(awkward_counts(args))


def cost_rows(first, second, first_s, second_s, recompiles) -> list[list]:
    compile_s = sum(r.compile_seconds for r in first.results)
    ruled = len(first.predictions) or len(first.results)
    return [
        ["candidates of the rule / try-run (first search)", f"{ruled} / {len(first.results)}",
         "<= 5 (+ current)", len(first.results) <= 5],
        ["first search s", first_s, "", ""],
        ["sum of compile s (first search)", compile_s, "", ""],
        ["search / compile", first_s / compile_s, "<= 1.3", first_s / compile_s <= 1.3],
        ["second search s", second_s, "", ""],
        ["compiles in second search", recompiles, "0", recompiles == 0],
        ["second / first", second_s / first_s, "<= 0.3", second_s / first_s <= 0.3],
    ]


def cost_figures(first, second, first_s, second_s, recompiles) -> str:
    headers = ["mesh", "kind", "compile", "compile s", "step s", "samples/s", "status"]
    return "\n\n".join([
        "First search:", table(headers, rows(first)),
        "Predicted vs measured (first search):", table(
            ["mesh", "rank", "predicted samples/s", "measured samples/s", "why"],
            [[str(p.shape), p.rank, p.samples_per_second, p.measured_samples_per_second,
              p.verdict] for p in first.predictions]),
        table(["figure", "value", "target", "met"],
              cost_rows(first, second, first_s, second_s, recompiles))])


def awkward_counts(args) -> str:
    """Part 4: a 32-layer model searched on 6 and on 7 devices."""
    cfg = dataclasses.replace(GPTConfig.preset("tiny"), num_layers=32)
    model = GPT(cfg, rngs=nnx.Rngs(0))
    trainer = Trainer(model, optax.adam(1e-3), global_batch=args.batch)
    data = ByteBatches(stdlib_text(1_000_000), seq_len=cfg.seq_len, batch_size=args.batch,
                       seed=0)
    batches = [data.batch(i) for i in range(args.warmup + args.steps)]
    out, summary = [], []
    for n in (6, 7):
        devices = jax.devices()[:n]
        state = trainer.init_state(MeshShape(args.p_min, 1, args.p_min), devices)
        start = time.perf_counter()
        decision = search(trainer, state, batches, devices, p_min=args.p_min,
                          warmup=args.warmup, steps=args.steps)
        seconds = time.perf_counter() - start
        best = decision.best.shape
        path = "vertical only" if n % args.p_min else "both axes"
        out.append(f"32-layer GPT on {n} devices ({path}), search {seconds:.1f} s:\n\n" + table(
                       ["mesh", "kind", "compile", "compile s", "step s", "samples/s",
                        "status"], rows(decision)))
        summary.append([n, str(best), f"{best.num_devices}/{n}",
                        f"{decision.best.samples_per_second:.1f}",
                        max(r.num_devices for r in decision.results)])
    return ("\n" + "\n\n".join(out) + "\n\n" + table(
        ["devices", "chosen", "devices used", "samples/s", "widest candidate's devices"],
        summary) + "\n")


if __name__ == "__main__":
    main()
