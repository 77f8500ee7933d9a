"""Regret of the pruned search against an exhaustive one, and how good the cost model's order is.

For each simulated device count (8, 16, 64; a child process each) and each model (GPT
tiny, Llama tiny, the MLP) and global batch, every candidate of the rule is try-run once
(the exhaustive search). The pruned search (`meshscale.planning.rank.pruned_search`,
starting from an uncalibrated cost model) is then replayed on those same measurements:
it sees only the try-runs it asks for, so

- regret = the exhaustive samples/s of the mesh it picks / the best exhaustive samples/s
  (target >= 0.95): what pruning costs, free of timing noise between two searches;
- Spearman = rank correlation of the predicted (constants fitted to the pruned search's
  own try-runs) and the measured samples/s over every candidate measured here (target
  >= 0.8), and over the pruned search's measured ones;
- measured = try-runs the pruned search asked for (current mesh excluded; target <= 5).

The default top-k is chosen here: the smallest k whose regret is >= 0.95 in every case.
Simulated devices share 2 cores, so a wider mesh does not add compute: the fitted
``compute_shared`` term captures that; on real devices ``compute`` does. Try-runs are
1 warm-up + 3 timed steps, compiled with XLA's cheaper CPU code generation (as the tests),
and batches are small (the device count, and twice it on 8 devices), so each device
count's child stays under ~10 minutes on a 2-core machine (8 devices: ~7 min).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks.common import table  # noqa: E402

MODELS = ("gpt-tiny", "llama-tiny", "mlp")
COUNTS = (8, 16, 64)
KS = (1, 2, 3, 4, 5)


def child(n: int, warmup: int, steps: int) -> list[dict]:
    from benchmarks.common import simulate_devices

    # XLA's cheaper CPU code generation (as the tests use): compiles take half as long,
    # and every mesh is compiled and timed under the same flags.
    os.environ["XLA_FLAGS"] = ("--xla_backend_optimization_level=0 "
                               "--xla_llvm_disable_expensive_passes=true")
    simulate_devices(n)
    import jax
    import optax
    from meshscale.models import registry

    from meshscale import Trainer, try_run
    from meshscale.planning import rank
    from meshscale.planning.cost import CostModel, Workload
    from meshscale.planning.space import candidates
    from meshscale.training.timing import Timing

    devices = jax.devices()
    cases = []  # (model, batch, candidates, workload, {shape: try-run}, exhaustive seconds)
    for name in MODELS:
        model, batch_fn = registry.build(name)
        for batch in (n, 2 * n) if n <= 8 else (n,):
            trainer = Trainer(model, optax.adam(1e-3), global_batch=batch)
            batches = [batch_fn(batch, i) for i in range(warmup + steps)]
            found = candidates(n, p_min=1, num_layers=trainer.num_layers, global_batch=batch)
            state = trainer.init_state(found[0].shape, devices)
            start = time.perf_counter()
            measured = {c.shape: try_run(trainer, state, batches, c, devices,
                                         timing=Timing(warmup=warmup, steps=steps))
                        for c in found}
            seconds = time.perf_counter() - start
            cases.append((name, batch, found, Workload.from_trainer(trainer), measured, seconds))
            print(f"{n} devices {name} batch {batch}: {len(found)} candidates, {seconds:.0f} s",
                  file=sys.stderr, flush=True)
            del state
    rows = []
    for name, batch, found, work, measured, seconds in cases:
        for k in KS:
            for calibrated in (False, True):
                cost = CostModel()
                if calibrated:  # the other models' try-runs on this machine: a kept calibration
                    for other, _, _, w, m, _ in cases:
                        for r in m.values():
                            if other != name and r.ok:
                                cost.observe(r.shape, w, r.step_seconds)
                row = replay(found, work, measured, cost, k, rank)
                rows.append(dict(row, devices=n, model=name, batch=batch, k=k, raw={
                    str(s): [r.samples_per_second, r.step_seconds] for s, r in measured.items()},
                                 calibrated=calibrated, exhaustive_seconds=seconds,
                                 compile_seconds=sum(r.compile_seconds
                                                     for r in measured.values())))
    return rows


def replay(found, work, measured, cost, k, rank) -> dict:
    """The pruned search on the exhaustive try-runs: what it picks, how it orders."""
    results, preds = rank.pruned_search(found, work, cost,
                                        lambda group: [measured[c.shape] for c in group],
                                        top_k=k)
    ok = {s: r.samples_per_second for s, r in measured.items() if r.ok}
    chosen = max((r for r in results if r.ok), key=lambda r: r.samples_per_second)
    fitted = {p.shape: p.samples_per_second for p in preds}
    every = [c.shape for c in found if c.shape in ok]
    mine = [r.shape for r in results if r.ok]
    return dict(candidates=len(found), measured=len(results), chosen=str(chosen.shape),
                best=str(max(ok, key=ok.get)), regret=ok[chosen.shape] / max(ok.values()),
                spearman_all=rank.spearman([fitted[s] for s in every], [ok[s] for s in every]),
                spearman_measured=rank.spearman([fitted[s] for s in mine], [ok[s] for s in mine]),
                pruned_compile_seconds=sum(r.compile_seconds for r in results))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--counts", default=",".join(map(str, COUNTS)))
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rows", default=None, help="also write every row (JSON) here")
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.warmup, args.steps)))
        return
    rows, start = [], time.perf_counter()
    for n in [int(c) for c in args.counts.split(",")]:
        env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
        proc = subprocess.run([sys.executable, "-m", "benchmarks.search_regret", "--child",
                               str(n), "--warmup", str(args.warmup), "--steps", str(args.steps)],
                              env=env, capture_output=True, text=True)
        if proc.returncode:
            sys.stderr.write(proc.stderr[-3000:])
            raise SystemExit(proc.returncode)
        rows += json.loads(proc.stdout.strip().splitlines()[-1])
    if args.rows:
        pathlib.Path(args.rows).write_text(json.dumps(rows))
    print(report(rows, time.perf_counter() - start))


def report(rows: list[dict], seconds: float) -> str:
    from meshscale.planning.rank import TOP_K

    out = [f"Pruned (top k + up to 2 uncertain + current) vs exhaustive, replayed on the same "
           f"try-runs; {len(rows) // len(KS) // 2} cases, {seconds:.0f} s in all. "
           "Uncalibrated: the search starts from the backend's prior constants; calibrated: "
           "from the other two models' try-runs on the same devices (a kept calibration).", ""]
    for calibrated in (False, True):
        mine = [r for r in rows if r["calibrated"] == calibrated]
        out += [f"{'Calibrated' if calibrated else 'Uncalibrated'}, top {TOP_K}:", "", table(
            ["devices", "model", "batch", "candidates", "try-runs", "chosen", "exhaustive best",
             "regret (>= 0.95)", "Spearman all (>= 0.8)", "Spearman measured"],
            [[r["devices"], r["model"], r["batch"], r["candidates"], r["measured"], r["chosen"],
              r["best"], r["regret"], r["spearman_all"], r["spearman_measured"]]
             for r in mine if r["k"] == TOP_K]), ""]
    by_k = {(k, c): [r for r in rows if r["k"] == k and r["calibrated"] == c]
            for k in KS for c in (False, True)}
    choose = next((k for k in KS if all(min(x["regret"] for x in by_k[k, c]) >= 0.95
                                        for c in (False, True))), None)
    out += [f"Top k chosen by measurement: the smallest k with every regret >= 0.95 "
            f"(both starts): {choose}; default TOP_K = {TOP_K}.", "", table(
                ["top k", "calibrated", "worst regret", "mean regret", "mean Spearman (all)",
                 "most try-runs", "pruned compile s / exhaustive"],
                [[k, c, min(r["regret"] for r in rs), _mean([r["regret"] for r in rs]),
                  _mean([r["spearman_all"] for r in rs]), max(r["measured"] for r in rs),
                  sum(r["pruned_compile_seconds"] for r in rs)
                  / sum(r["compile_seconds"] for r in rs)] for (k, c), rs in by_k.items()])]
    return "\n".join(out)


def _mean(values):
    values = [v for v in values if v == v]
    return sum(values) / len(values) if values else float("nan")


if __name__ == "__main__":
    main()
