"""Pipeline overhead, measured side by side in one run.

1. meshscale's 1x1 step vs a hand-written `jax.jit` step of the same model and optimizer
   (target: ratio <= 1.10).
2. For p in 2, 4, 8 stages with m in 1, p, 4p microbatches on p simulated devices: the
   step time over the 1x1 time, next to GPipe's (m + p - 1) / m. Simulated devices share
   this machine's cores, so the ratio shows the pipeline's total work and overheads, not
   a speed-up.
"""

from __future__ import annotations

import argparse

from benchmarks.common import median_seconds, simulate_devices, table

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

    def run_plain():
        p, o, loss = plain_step(*plain["state"], device_batch)
        plain["state"] = (p, o)
        loss.block_until_ready()

    def meshscale_runner(shape):
        step = trainer.compile_step(shape)
        holder = {"state": trainer.init_state(shape)}
        placed = trainer.put_batch(batch, shape)

        def run():
            holder["state"], metrics = step(holder["state"], placed)
            metrics["loss"].block_until_ready()

        return run

    t_plain = median_seconds(run_plain, repeats=args.repeats)
    t_one = median_seconds(meshscale_runner(MeshShape(1, 1, 1)), repeats=args.repeats)
    print(f"GPT tiny, global batch {args.batch}, jax {jax.__version__}, "
          f"{jax.device_count()} simulated {jax.devices()[0].platform} devices\n")
    print(table(["step", "seconds", "ratio"], [
        ["plain jax.jit", t_plain, 1.0],
        ["meshscale 1x1", t_one, t_one / t_plain],
    ]))
    print(f"\nmeshscale 1x1 / plain jit = {t_one / t_plain:.3f} (target <= 1.10)\n")

    rows = []
    for p in (2, 4, 8):
        for m in (1, p, 4 * p):
            if args.batch % m:
                continue
            t = median_seconds(meshscale_runner(MeshShape(p, 1, m)), repeats=args.repeats)
            rows.append([f"{p}x1", m, t, t / t_one, (m + p - 1) / m])
    print(table(["mesh", "microbatches", "step s", "measured / 1x1", "GPipe (m+p-1)/m"], rows))


if __name__ == "__main__":
    main()
