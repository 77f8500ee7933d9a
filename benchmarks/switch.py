"""Device change to first step on the new mesh, with and without background pre-compiling.

For each model: the job trains on 8 devices, then the scheduler takes 2 away (a forced
switch). Measured side by side in one run:
- change -> first step on the new mesh, pre-compiled (candidates compiled in the
  background before the change) and cold (every candidate compiled on the spot);
- the compiles paid on the critical path in each case (from the compile cache's record);
- checkpoint save + restore alone, the floor of any switch;
- the training step slowdown while the background compiler runs (CPU: same cores).
Target: pre-compiled change -> new mesh <= 1.5x save + restore.
"""

from __future__ import annotations

import argparse
import tempfile
import time

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
    SearchSpace,
    SwitchPolicy,
    Timing,
    Trainer,
    resources,
)
from meshscale.elastic.trainer import ElasticTrainer  # noqa: E402
from meshscale.layout.mesh import MeshShape  # noqa: E402
from meshscale.planning.precompile import Precompiler  # noqa: E402
from meshscale.store.checkpoint import Checkpointer  # noqa: E402

SPACE = SearchSpace(p_min=2, max_pipe=4)
TIMING = Timing(warmup=1, steps=2)


def change(model, data, batch, *, precompile: bool) -> dict:
    counts = {"n": 8}
    cache = CompileCache()
    with tempfile.TemporaryDirectory() as tmp:
        elastic = ElasticTrainer(
            Trainer(model, optax.adam(1e-3), global_batch=batch, cache=cache),
            checkpoint_dir=tmp,
            resources=resources.Callback(lambda: counts["n"], announced=lambda: [6]),
            space=SPACE, timing=TIMING,
            switching=SwitchPolicy(check_every=10**9, precompile="on" if precompile else "off"),
            checkpoints=CheckpointPolicy(persistent_cache=False))
        state = elastic.init(data.batch(0))
        for i in range(1, 6):
            state, _ = elastic.step(state, data.batch(i))
        if precompile:
            elastic.precompiler.wait()
        before = cache.count("miss", "on-demand")
        counts["n"] = 6
        start = time.perf_counter()
        state = elastic.check(state, data.batch(6))
        state, _ = elastic.step(state, data.batch(7))
        seconds = time.perf_counter() - start
        events = {e["event"]: e for e in elastic.history[-6:]}
        return {"seconds": seconds, "on_demand": cache.count("miss", "on-demand") - before,
                "mesh": str(elastic.shape), "search": events["search"]["seconds"],
                "checkpoint": events["checkpoint"]["seconds"],
                "switch": events["switch"]["seconds"],
                "slowdown": slowdown(elastic, state, data) if precompile else None}


def slowdown(elastic, state, data) -> dict[str, float]:
    """Step time while the background compiler works / while it is paused, in
    alternating rounds of 3 steps (`common.interleaved`; `Precompiler.paused`)."""
    held = {"state": state}

    def steps():
        for i in range(3):
            held["state"], m = elastic.step(held["state"], data.batch(100 + i))
        jax.block_until_ready(m["loss"])

    # Meshes not compiled yet (every microbatch count), so the compiler really works.
    busy_compiler = Precompiler(elastic.trainer, budget=4,
                                space=SearchSpace(p_min=2, microbatches=[1, 3, 6]))

    def paused():
        with busy_compiler.paused():
            steps()

    queued = busy_compiler.plan([4, 6], jax.devices()[:6], current=None)
    times = interleaved({"busy": steps, "idle": paused}, rounds=4, warmup=0)
    busy_compiler.wait()
    busy_compiler.close()
    assert queued and busy_compiler.records, "nothing was compiled in the background"
    return ratio(times["busy"], times["idle"])


def save_restore(model, batch) -> float:
    trainer = Trainer(model, optax.adam(1e-3), global_batch=batch)
    state = trainer.init_state(MeshShape(2, 4, 2))
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Checkpointer(tmp, trainer)
        start = time.perf_counter()
        ckpt.save(state)
        ckpt.wait()
        restored = ckpt.restore(MeshShape(2, 3, 2))
        jax.block_until_ready(restored)
        return time.perf_counter() - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="tiny,small")
    args = parser.parse_args(argv)
    rows = []
    for preset in args.presets.split(","):
        cfg = GPTConfig.preset(preset)
        batch = 24
        model = GPT(cfg, rngs=nnx.Rngs(0))
        data = ByteBatches(stdlib_text(1_000_000), seq_len=cfg.seq_len, batch_size=batch)
        cold = change(model, data, batch, precompile=False)
        warm = change(model, data, batch, precompile=True)
        floor = save_restore(model, batch)
        for name, r in (("cold", cold), ("pre-compiled", warm)):
            rows.append([f"gpt-{preset}", name, r["mesh"], r["seconds"], r["on_demand"],
                         r["checkpoint"], r["search"], r["switch"], floor, r["seconds"] / floor,
                         "-" if r["slowdown"] is None else ratio_text(r["slowdown"])])
    print(f"8 -> 6 simulated {jax.devices()[0].platform} devices, jax {jax.__version__}; "
          f"try-runs: warmup {TIMING.warmup}, {TIMING.steps} timed steps, "
          f"max_pipe {SPACE.max_pipe}\n")
    print(table(["model", "compiles", "new mesh", "change->first step s", "compiles on path",
                 "checkpoint s", "search s", "switch s", "save+restore s",
                 "change / save+restore",
                 "step slowdown while pre-compiling (median, min, max)"], rows))


if __name__ == "__main__":
    main()
