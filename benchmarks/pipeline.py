"""Pipeline overhead, measured side by side in one run.

1. meshscale's 1x1 step vs a hand-written `jax.jit` step of the same model and optimizer
   (target: ratio <= 1.10), timed in alternating rounds (`common.interleaved`): the
   median of the round ratios with their min and max. (Timed one after the other the
   ratio read 0.85 in one run and 1.34 in another; the machine's load had moved.)
2. For p in 2, 4, 8 stages with m in 1, p, 4p microbatches on p simulated devices: the
   step time over the 1x1 time, next to GPipe's (m + p - 1) / m. Simulated devices share
   this machine's cores, so the ratio shows the pipeline's total work and overheads, not
   a speed-up.
"""

from __future__ import annotations

import argparse

from benchmarks.common import (
    interleaved,
    ratio,
    ratio_text,
    simulate_devices,
    table,
)

simulate_devices(8)

import jax  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from meshscale import MeshShape, Trainer  # noqa: E402
from meshscale.model import FunctionalModel  # noqa: E402
from models.gpt import GPT, GPTConfig  # noqa: E402


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
        step = trainer.compile_step(shape)
        holder = {"state": trainer.init_state(shape)}
        placed = trainer.put_batch(batch, shape)

        def run():
            for _ in range(n):
                holder["state"], metrics = step(holder["state"], placed)
            metrics["loss"].block_until_ready()

        return run

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


if __name__ == "__main__":
    main()
