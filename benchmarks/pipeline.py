"""Pipeline overhead, measured side by side in one run.

1. meshscale's 1x1 step vs a hand-written `jax.jit` step of the same model and optimizer
   (target: ratio <= 1.10), timed in alternating rounds (`common.interleaved`): the
   median of the round ratios with their min and max. (Timed one after the other the
   ratio read 0.85 in one run and 1.34 in another; the machine's load had moved.)
   Then meshscale ``fsdp`` on 1x8 against plain `jax.jit` FSDP of the same model on the
   same 8 devices (`common.plain_fsdp`: GSPMD partitions the step), interleaved the same
   way (target: ratio <= 1.0).
2. For p in 2, 4, 8 stages with m in 1, p, 4p microbatches on p simulated devices: the
   step time over the 1x1 time, next to GPipe's (m + p - 1) / m. Simulated devices share
   this machine's cores, so the ratio shows the pipeline's total work and overheads, not
   a speed-up.
3. Uneven stages and the circular schedule (8 layers on 3, 5, 6, 7 stages; 2, 3 and 4
   stages with 2 or 4 rounds): the executed and idle stage-ticks counted from each
   schedule's tick table (`Schedule.busy`, the rule the pipeline runs) next to the bubble
   formula (p - 1) / (r m + p - 1), the layer slots the lockstep ticks wait on (short
   groups), and the measured step time over 1x1 (shared cores: total work, not speed).
4. Device use of the rule for real layer counts (Llama-3-8B 32, Qwen2.5-7B 28,
   Llama-2-13B 40, Llama-3-70B 80) on n = 2..16 devices, p_min 2, batch 256: the widest
   candidate's devices over n, with uneven stages and, side by side, with pipe widths
   restricted to divisors of the layer count (meshscale 0.1's rule). Pure arithmetic.
"""

from __future__ import annotations

import argparse

from benchmarks.common import (
    interleaved,
    plain_fsdp,
    ratio,
    ratio_text,
    simulate_devices,
    table,
)

simulate_devices(8)

import jax  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from meshscale.models.gpt import GPT, GPTConfig  # noqa: E402

from meshscale import MeshShape, Trainer  # noqa: E402
from meshscale.layout.schedule import Schedule  # noqa: E402
from meshscale.model.contract import FunctionalModel  # noqa: E402
from meshscale.planning.space import candidates, default_microbatches  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)

    model = GPT(GPTConfig.preset("tiny"), rngs=nnx.Rngs(0))
    optimizer = optax.adam(1e-3)
    trainer = Trainer(model, optimizer, global_batch=args.batch)
    batch = jax.device_get(model.example_batch(args.batch))

    fmodel, params = FunctionalModel.of(model)

    @jax.jit
    def plain_step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(fmodel.loss)(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    plain = {"state": (params, optimizer.init(params))}
    device_batch = jax.device_put(batch)

    def run_plain(n: int = 1):
        for _ in range(n):
            p, o, loss = plain_step(*plain["state"], device_batch)
            plain["state"] = (p, o)
        loss.block_until_ready()

    def meshscale_runner(shape, n: int = 1):
        return runner(trainer, shape, batch, n)

    per_round = 3
    times = interleaved({"plain": lambda: run_plain(per_round),
                         "one": meshscale_runner(MeshShape(1, 1, 1), per_round)},
                        rounds=args.repeats)
    one_over_plain = ratio(times["one"], times["plain"])
    t_plain = sorted(times["plain"])[len(times["plain"]) // 2] / per_round
    t_one = sorted(times["one"])[len(times["one"]) // 2] / per_round
    print(f"GPT tiny, global batch {args.batch}, jax {jax.__version__}, "
          f"{jax.device_count()} simulated {jax.devices()[0].platform} devices; "
          f"{args.repeats} interleaved rounds of {per_round} steps\n")
    print(table(["step", "median s/step", "ratio to plain (median, min, max)"], [
        ["plain jax.jit", t_plain, "1"],
        ["meshscale 1x1", t_one, ratio_text(one_over_plain)],
    ]))
    print(f"\nmeshscale 1x1 / plain jit = {ratio_text(one_over_plain)} (target <= 1.10: "
          f"{one_over_plain['median'] <= 1.10})\n")

    print(fsdp_against_plain(model, optimizer, batch, rounds=args.repeats))

    rows = []
    for p in (2, 4, 8):
        for m in (1, p, 4 * p):
            if args.batch % m:
                continue
            pair = interleaved({"one": meshscale_runner(MeshShape(1, 1, 1)),
                                "p": meshscale_runner(MeshShape(p, 1, m))},
                               rounds=args.repeats)
            r = ratio(pair["p"], pair["one"])
            rows.append([f"{p}x1", m, sorted(pair["p"])[len(pair["p"]) // 2],
                         ratio_text(r), (m + p - 1) / m])
    print(table(["mesh", "microbatches", "step s", "measured / 1x1 (median, min, max)",
                 "GPipe (m+p-1)/m"], rows))

    print("\nUneven stages and the circular schedule, 8 layers (stage-ticks counted from "
          "each schedule's tick table; measured on shared cores):\n")
    shapes = [MeshShape(p, 1, default_microbatches(p, args.batch)) for p in (3, 5, 6, 7)]
    shapes += [MeshShape(2, 1, 4, 2), MeshShape(2, 1, 4, 4), MeshShape(3, 1, 8, 2),
               MeshShape(4, 1, 8, 2), MeshShape(4, 1, 8, 1)]
    rows = []
    for shape in shapes:
        sched = Schedule.of(shape, trainer.num_layers)
        busy = sched.busy()
        idle = int((~busy).sum())
        formula = (shape.pipe - 1) / (shape.repeats * shape.microbatches + shape.pipe - 1)
        pair = interleaved({"one": meshscale_runner(MeshShape(1, 1, 1)),
                            "p": meshscale_runner(shape)}, rounds=args.repeats)
        rows.append([str(shape), ",".join(str(n) for n in sched.group_sizes), sched.ticks,
                     int(busy.sum()), idle, shape.pipe * (shape.pipe - 1),
                     f"{idle / busy.size:.4f}", f"{formula:.4f}",
                     idle == shape.pipe * (shape.pipe - 1) and
                     abs(idle / busy.size - formula) < 1e-12,
                     sched.padding_slots(), ratio_text(ratio(pair["p"], pair["one"]))])
    print(table(["mesh", "layers per group", "ticks", "busy stage-ticks", "idle stage-ticks",
                 "p(p-1)", "idle share counted", "(p-1)/(rm+p-1)", "equal",
                 "padding slots / step", "measured / 1x1 (median, min, max)"], rows))
    print(device_use())


def runner(trainer, shape, batch, n: int = 1):
    """``run()``: `n` meshscale steps on `shape`, blocking on the last loss."""
    step = trainer.compile_step(shape)
    holder = {"state": trainer.init_state(shape)}
    placed = trainer.put_batch(batch, shape)

    def run():
        for _ in range(n):
            holder["state"], metrics = step(holder["state"], placed)
        metrics["loss"].block_until_ready()

    return run


def fsdp_against_plain(model, optimizer, batch, *, rounds: int, per_round: int = 3) -> str:
    """meshscale ``fsdp`` on 1x8 against plain `jax.jit` FSDP (`common.plain_fsdp`) of
    the same model, batch and optimizer on the same 8 devices, interleaved."""
    fmodel, params = FunctionalModel.of(model)
    opt_state = optimizer.init(params)
    step, shardings, rows = plain_fsdp(fmodel, optimizer, params, opt_state)
    holder = {"state": jax.device_put((params, opt_state), shardings)}
    placed = jax.device_put(batch, rows)

    def run_plain():
        for _ in range(per_round):
            p, o, loss = step(*holder["state"], placed)
            holder["state"] = (p, o)
        loss.block_until_ready()

    batch_size = len(jax.tree.leaves(batch)[0])
    trainer = Trainer(model, optimizer, global_batch=batch_size, state_sharding="fsdp")
    times = interleaved({"plain": run_plain,
                         "fsdp": runner(trainer, MeshShape(1, 8, 1), batch, per_round)},
                        rounds=rounds)
    r = ratio(times["fsdp"], times["plain"])
    median = lambda t: sorted(t)[len(t) // 2] / per_round
    return "\n".join([
        f"FSDP on 8 devices, {rounds} interleaved rounds of {per_round} steps:", "",
        table(["step", "median s/step", "ratio to plain FSDP (median, min, max)"], [
            ["plain jax.jit FSDP (GSPMD)", median(times["plain"]), "1"],
            ["meshscale 1x8/m1 fsdp", median(times["fsdp"]), ratio_text(r)]]), "",
        f"meshscale 1x8 fsdp / plain jit FSDP = {ratio_text(r)} (target <= 1.0: "
        f"{r['median'] <= 1.0})", ""])


REAL_LAYERS = {"Llama-3-8B": 32, "Qwen2.5-7B": 28, "Llama-2-13B": 40, "Llama-3-70B": 80}


def device_use(p_min: int = 2, batch: int = 256) -> str:
    """The widest candidate's device use for each real layer count and n = 2..16."""
    def widest(n, layers, *, divisors_only):
        found = [c.shape for c in candidates(n, p_min=p_min, num_layers=layers,
                                             global_batch=batch)
                 if not divisors_only or layers % c.shape.pipe == 0]
        return max(found, key=lambda s: (s.num_devices, s.data))

    rows, totals = [], {True: [], False: []}
    for n in range(2, 17):
        row = [n]
        for layers in REAL_LAYERS.values():
            now, before = (widest(n, layers, divisors_only=d) for d in (False, True))
            totals[False].append(now.num_devices / n)
            totals[True].append(before.num_devices / n)
            row.append(f"{now.pipe}x{now.data}: {now.num_devices}/{n} "
                       f"(divisors only {before.pipe}x{before.data}: {before.num_devices})")
        rows.append(row)
    summary = [[name, f"{100 * sum(v) / len(v):.1f}%", sum(x < 1 for x in v), len(v)]
               for name, v in (("uneven stages (this rule)", totals[False]),
                               ("divisors of L only (0.1)", totals[True]))]
    return ("\nDevice use of the widest candidate, p_min 2, batch 256:\n\n"
            + table(["n"] + [f"{k} ({v} layers)" for k, v in REAL_LAYERS.items()], rows)
            + "\n\n" + table(["pipe widths", "mean device use", "cases with idle devices",
                                "cases"], summary) + "\n")


if __name__ == "__main__":
    main()
