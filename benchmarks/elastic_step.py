"""What `ElasticTrainer.step` costs over the bare compiled step, timed interleaved.

Three loops over the same GPT tiny batches, each round `--steps` steps ended by one
block, the loops taking turns round by round (`benchmarks.common.interleaved`):

1. bare: the compiled step the trainer runs, fed with `jax.device_put(batch, sharding)`;
2. `ElasticTrainer.step` without checkpoints (device polls every
   `SwitchPolicy.check_every`, a block every `Timing.window` steps for the loss records,
   the timing and the non-finite check of every step's loss and gradient norm; the batch
   checked against the compiled structure; the preemption check);
3. the same with `CheckpointPolicy(on_nonfinite="skip_step")` and
   `Trainer(skip_nonfinite=True)` (a select on the device per step);
4. the same as (2) with `CheckpointPolicy(every=10)` (asynchronous Orbax saves of the
   whole state, each with its checksums and finiteness pass on the devices);
5. the same with the default `CheckpointPolicy.every` (100);
6. (2) without metrics (`MetricsPolicy(jsonl=False, tensorboard=False)`): (2) writes
   every timing window to metrics.jsonl and TensorBoard, as every run does by default.

Targets: (2) / (1) <= 1.05, (4) / (1) <= 1.10 and (2) / (6) <= 1.02, what the metrics
writers cost (median of the round ratios; min and max shown). Every loop runs on a 2x1/m2
mesh of 2 simulated devices (p_min 2, one candidate), so all compare the same executable.
"""

from __future__ import annotations

import argparse
import tempfile

from benchmarks.common import interleaved, ratio, ratio_text, simulate_devices, table

simulate_devices(8)

import jax  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from meshscale.models.gpt import GPT, GPTConfig  # noqa: E402
from meshscale.models.text import ByteBatches, stdlib_text  # noqa: E402

from meshscale import (  # noqa: E402
    CheckpointPolicy,
    CompileCache,
    MetricsPolicy,
    SearchSpace,
    Timing,
    Trainer,
    resources,
)
from meshscale.elastic.trainer import ElasticTrainer  # noqa: E402

SPACE = SearchSpace(p_min=2, max_pipe=2, microbatches=[2])
TIMING = Timing(warmup=1, steps=1)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)  # as the other benchmarks
    parser.add_argument("--steps", type=int, default=20, help="steps per round")
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args(argv)

    cfg = GPTConfig.preset("tiny")
    data = ByteBatches(stdlib_text(1_000_000), seq_len=cfg.seq_len, batch_size=args.batch)
    batches = [data.batch(i) for i in range(args.steps)]
    optimizer, cache = optax.adam(1e-3), CompileCache()
    scratch = tempfile.TemporaryDirectory(prefix="meshscale-bench-")

    def elastic(name: str, metrics: MetricsPolicy | None = None,
                **checkpoints) -> ElasticTrainer:
        """`checkpoints`: `CheckpointPolicy` fields."""
        policy = CheckpointPolicy(max_to_keep=2, persistent_cache=False, **checkpoints)
        return ElasticTrainer(
            Trainer(GPT(cfg, rngs=nnx.Rngs(0)), optimizer, global_batch=args.batch,
                    skip_nonfinite=policy.on_nonfinite == "skip_step", cache=cache),
            checkpoint_dir=f"{scratch.name}/{name}", resources=resources.Static(2),
            space=SPACE, timing=TIMING, checkpoints=policy, metrics=metrics)

    trainers = {"plain": elastic("plain", every=None),
                "skip": elastic("skip", every=None, on_nonfinite="skip_step"),
                "saving": elastic("saving", every=10),
                "default": elastic("default"),
                "unwatched": elastic("unwatched", every=None, metrics=MetricsPolicy(
                    jsonl=False, tensorboard=False))}
    plain, saving = trainers["plain"], trainers["saving"]
    states = {name: t.init(batches[0]) for name, t in trainers.items()}
    assert len({t.shape for t in trainers.values()}) == 1
    shape, devices = plain.shape, plain.devices
    step = plain.trainer.compile_step(shape, devices)
    sharding = plain.trainer.batch_sharding(shape, devices)
    bare = {"state": plain.trainer.init_state(shape, devices)}

    def run_bare():
        state, metrics = bare["state"], None
        for batch in batches:
            state, metrics = step(state, jax.device_put(batch, sharding))
        bare["state"] = state
        jax.block_until_ready(metrics)

    def runner(trainer: ElasticTrainer, name: str):
        def run():
            state, metrics = states[name], None
            for batch in batches:
                state, metrics = trainer.step(state, batch)
            states[name] = state
            jax.block_until_ready(metrics["loss"])
        return run

    times = interleaved({"bare": run_bare, **{name: runner(t, name)
                                              for name, t in trainers.items()}},
                        rounds=args.rounds)
    for t in trainers.values():
        t.close()
    scratch.cleanup()
    step_ratio = ratio(times["plain"], times["bare"])
    ckpt_ratio = ratio(times["saving"], times["bare"])
    metrics_ratio = ratio(times["plain"], times["unwatched"])
    per_step = lambda name: sorted(t / args.steps for t in times[name])[len(times[name]) // 2]
    print(f"GPT tiny, global batch {args.batch}, mesh {shape} on {len(devices)} simulated "
          f"{jax.devices()[0].platform} devices, jax {jax.__version__}; {args.rounds} "
          f"interleaved rounds of {args.steps} steps; saves: "
          f"{saving.totals.checkpoints} (checkpoint_every=10), "
          f"{trainers['default'].totals.checkpoints} (default)\n")
    print(table(["loop", "median s/step", "ratio to bare (median, min, max)", "target",
                 "met"], [
        ["bare compiled step", per_step("bare"), "1", "", ""],
        ["ElasticTrainer.step (non-finite check on)", per_step("plain"),
         ratio_text(step_ratio), "<= 1.05", str(step_ratio["median"] <= 1.05)],
        ["ElasticTrainer.step, on_nonfinite=skip_step", per_step("skip"),
         ratio_text(ratio(times["skip"], times["bare"])), "", ""],
        ["ElasticTrainer.step, checkpoint_every=10", per_step("saving"),
         ratio_text(ckpt_ratio), "<= 1.10", str(ckpt_ratio["median"] <= 1.10)],
        ["ElasticTrainer.step, default checkpoint_every", per_step("default"),
         ratio_text(ratio(times["default"], times["bare"])), "", ""],
        ["ElasticTrainer.step without metrics writers", per_step("unwatched"),
         ratio_text(ratio(times["unwatched"], times["bare"])), "", ""],
    ]))
    print(f"\nmetrics writers (metrics.jsonl + TensorBoard, every {TIMING.window}-step "
          f"window) / none: {ratio_text(metrics_ratio)}; target <= 1.02: "
          f"{metrics_ratio['median'] <= 1.02}")


if __name__ == "__main__":
    main()
