"""Per-device memory on every mesh, read from XLA (`compiled.memory_analysis()`).

1. GPT tiny with a 16k vocabulary on 8 simulated devices: arguments + temporaries per
   device for every 8-device mesh and state-sharding mode, over (the one-device plain
   `jax.jit` program's bytes / 8), next to the analytic state bytes per device. Targets:
   best mesh <= 1.5, the 8x1 pipeline <= 2.0, fully sharded state <= 1.1x its even share.
2. Llama-3-8B shapes on 8 devices and 70B shapes on 64 devices, built abstractly from a
   constructor and compiled only (nothing allocated): GB per device for each mode, the
   `p_min` for an 80 GB device (smallest pipe width whose `p x (n/p)` step fits), and
   this process's peak host RSS (target for 70B: < 4 GB).
3. The vertical path on Llama-3-8B: 32 layers on 3..8 stages (uneven widths store the
   stack padded to pipe x ceil(32/pipe) rows) and one circular schedule: GB per device and
   the fully sharded state over its even share (the padding's cost).

Each device count runs in its own process (XLA fixes it at import).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import time

from benchmarks.common import plain_fsdp, table

MODES = ("replicate", "zero1", "fsdp")
GB, MiB = 1e9, 2**20


def _need(compiled) -> int:
    stats = compiled.memory_analysis()
    return stats.argument_size_in_bytes + stats.temp_size_in_bytes


def plain_fsdp_need(make_model, optimizer, example) -> int:
    """Arguments + temporaries per device of plain `jax.jit` FSDP (`common.plain_fsdp`)
    of the model `make_model` builds, on `example` (abstract); compiled only."""
    import jax
    from flax import nnx

    from meshscale.model.contract import FunctionalModel

    fmodel, params = FunctionalModel.of(nnx.eval_shape(make_model))
    opt_state = jax.eval_shape(optimizer.init, params)
    step, shardings, rows = plain_fsdp(fmodel, optimizer, params, opt_state)
    place = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
    state = jax.tree.map(place, (params, opt_state), shardings)
    batch = jax.tree.map(lambda x: place(x, rows), example)
    return _need(step.lower(*state, batch).compile())


def gpt_table() -> str:
    import jax
    import optax
    from flax import nnx
    from meshscale.models.gpt import GPT, GPTConfig

    from meshscale import MeshShape, Trainer
    from meshscale.model.contract import FunctionalModel
    from meshscale.planning.space import default_microbatches

    cfg = dataclasses.replace(GPTConfig.preset("tiny"), vocab=16384)
    batch = 32
    model = GPT(cfg, rngs=nnx.Rngs(0))
    optimizer = optax.adam(1e-3)
    fmodel, params = FunctionalModel.of(model)
    example = model.example_batch(batch)

    def plain_step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(fmodel.loss)(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    one = _need(jax.jit(plain_step, donate_argnums=(0, 1)).lower(
        params, optimizer.init(params), example).compile())
    share = one / 8
    plain = plain_fsdp_need(lambda: GPT(cfg, rngs=nnx.Rngs(0)), optimizer,
                       jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), example))
    rows, best = [], {}
    for mode in MODES:
        trainer = Trainer(model, optimizer, global_batch=batch, state_sharding=mode)
        total_state = trainer.state_bytes_per_device(MeshShape(1, 1))
        for pipe in (1, 2, 4, 8):
            shape = MeshShape(pipe, 8 // pipe, default_microbatches(pipe, batch))
            need = _need(trainer.compile_step(shape))
            state = trainer.state_bytes_per_device(shape)
            best[mode] = min(best.get(mode, need), need)
            rows.append([mode, str(shape), round(need / MiB, 1), round(need / share, 2),
                         round(need / plain, 2), round(state / MiB, 2),
                         round(state / (total_state / 8), 2)])
    out = [f"GPT tiny, vocab 16384, global batch 32, Adam, float32; one device (plain "
           f"`jax.jit`): {one / MiB:.1f} MiB, so one-device / 8 = {share / MiB:.1f} MiB.", "",
           f"Plain `jax.jit` FSDP over the 8 devices (`common.plain_fsdp`): {plain / MiB:.1f} MiB.",
           "", table(["state sharding", "mesh", "MiB / device (args + temp)",
                      "/ (one device / 8)", "/ plain FSDP", "state MiB / device",
                      "state / even share"], rows)]
    out += ["", "Best 8-device mesh per mode, over one device / 8: " + ", ".join(
        f"{m} {best[m] / share:.2f}" for m in MODES)]
    out += ["", step_times(model, optimizer, batch, example)]
    return "\n".join(out)


def step_times(model, optimizer, batch, example, rounds: int = 9) -> str:
    """Step time per mode on 2x4, timed interleaved (3 steps a mode, alternating rounds)."""
    import statistics

    import jax

    from meshscale import MeshShape, Trainer

    shape = MeshShape(2, 4, 4)
    runs = {}
    for mode in MODES:
        trainer = Trainer(model, optimizer, global_batch=batch, state_sharding=mode)
        step = trainer.compile_step(shape)
        runs[mode] = [trainer, step, trainer.init_state(shape), trainer.put_batch(example, shape)]
    times = {mode: [] for mode in MODES}
    for r in range(rounds + 1):
        for mode, run in runs.items():
            trainer, step, state, placed = run
            start = time.perf_counter()
            for _ in range(3):
                state, metrics = step(state, placed)
            jax.block_until_ready(metrics)
            run[2] = state
            if r:  # round 0 warms up
                times[mode].append((time.perf_counter() - start) / 3)
    base = statistics.median(times["replicate"])
    rows = [[mode, round(statistics.median(t) * 1e3, 1), round(statistics.median(t) / base, 2),
             round(min(t) / base, 2), round(max(t) / base, 2)] for mode, t in times.items()]
    return "\n".join([f"Step time on {shape}, {rounds} interleaved rounds of 3 steps:", "",
                      table(["state sharding", "median ms", "/ replicate", "min", "max"],
                            rows)])


def save_bytes(trainer, shape) -> int:
    """Per-device bytes while a checkpoint of `shape`'s state is written: the state plus
    the layer-major copy of a circular mesh's stacks (`meshscale.layout.stacking`),
    each copy's size from its compiled program's `memory_analysis` (outputs)."""
    import jax

    from meshscale.layout import stacking

    targets = trainer.targets(shape)
    copies = 0
    for t, n in zip(jax.tree.leaves(targets),
                    jax.tree.leaves(stacking.tree_axes(targets, trainer.num_layers)),
                    strict=True):
        if n > 1:
            flat = stacking.layer_major_target(t, n)
            fn = jax.jit(lambda x, s=flat.shape: x.reshape(s), out_shardings=flat.sharding)
            copies += fn.lower(t).compile().memory_analysis().output_size_in_bytes
    return trainer.state_bytes_per_device(shape) + copies


def llama_table(preset: str, devices: int, meshes: list[str], batch: int,
                seq_len: int, modes: list[str] | None = None) -> str:
    import jax
    import optax
    from flax import nnx
    from meshscale.models.llama import Llama, LlamaConfig

    from meshscale import MeshShape, Trainer

    cfg = dataclasses.replace(LlamaConfig.preset(preset), seq_len=seq_len)
    example = {"tokens": jax.ShapeDtypeStruct((batch, seq_len + 1), "int32")}
    rows, pmin = [], {}
    modes = modes or MODES
    make = lambda: Llama(cfg, rngs=nnx.Rngs(0))
    plain = plain_fsdp_need(make, optax.adam(1e-4), example)
    for mode in modes:
        trainer = Trainer(make, optax.adam(1e-4),
                          global_batch=batch, example_batch=example, state_sharding=mode)
        for text in meshes:
            shape = MeshShape.parse(text)
            start = time.perf_counter()
            need = _need(trainer.compile_step(shape))
            state = trainer.state_bytes_per_device(shape)
            even = trainer.state_bytes_per_device(MeshShape(1, 1)) / shape.num_devices
            rows.append([mode, text, f"{trainer.rows(shape)}/{trainer.num_layers}",
                         round(need / GB, 1), round(state / GB, 1),
                         round(save_bytes(trainer, shape) / GB, 1),
                         round(state / even, 2) if mode == "fsdp" else "",
                         round(need / plain, 2) if shape.num_devices == devices else "",
                         round(time.perf_counter() - start, 1)])
            if need <= 80 * GB and mode not in pmin:
                pmin[mode] = shape.pipe
    params = sum(x.size for x in jax.tree.leaves(trainer.abstract_state().params))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    head = (f"Llama-3-{preset.upper()} shapes ({params / 1e9:.1f} B parameters), float32 "
            f"weights + Adam, global batch {batch} x {seq_len} tokens, {devices} simulated "
            f"devices, compiled from a constructor (nothing allocated).")
    return "\n".join([head, "", table(
        ["state sharding", "mesh", "stored rows / layers", "GB / device (args + temp)",
         "state GB / device", "saving GB / device", "fsdp state / even share",
         "/ plain FSDP", "compile s"],
        rows), "",
        f"Plain `jax.jit` FSDP of the same model and batch on the {devices} devices "
        f"(`common.plain_fsdp`): {plain / GB:.2f} GB / device (args + temp); \"/ plain "
        "FSDP\" is shown for the meshes that use every device. \"saving\": the state "
        "while a checkpoint is written, with the layer-major copy of a circular mesh's "
        "stack (checkpoints are layer-major).",
        "p_min for an 80 GB device (smallest pipe width of the meshes above that fits): " +
        ", ".join(f"{m} {pmin.get(m, 'none')}" for m in modes),
        f"Peak host RSS of this process: {rss:.2f} GiB."])


def _child(part: str) -> None:
    from benchmarks.common import simulate_devices

    spec = json.loads(part)
    simulate_devices(spec["devices"])
    if spec["what"] == "gpt":
        print(gpt_table())
    else:
        print(llama_table(spec["preset"], spec["devices"], spec["meshes"], spec["batch"],
                          spec["seq_len"], spec.get("modes")))


PARTS = [
    {"what": "gpt", "devices": 8},
    {"what": "llama", "preset": "8b", "devices": 8, "batch": 16, "seq_len": 2048,
     "meshes": ["1x8/m2", "2x4/m4", "4x2/m8", "8x1/m16"]},
    {"what": "llama", "preset": "70b", "devices": 64, "batch": 64, "seq_len": 2048,
     "meshes": ["1x64/m1", "2x32/m2", "4x16/m4", "8x8/m8", "16x4/m16"]},
    # The vertical path (#11): 32 layers on every pipe width 3..8, uneven ones stored
    # padded to pipe * ceil(32 / pipe) rows, and a circular schedule (its stack stored as
    # [repeats, pipe * slots], `meshscale.layout.stacking`).
    {"what": "llama", "preset": "8b", "devices": 8, "batch": 16, "seq_len": 2048,
     "meshes": ["3x1/m8", "4x1/m8", "5x1/m16", "6x1/m16", "7x1/m16", "8x1/m16", "4x1/m8/r2"],
     "modes": ["replicate", "fsdp"]},
]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.part:
        _child(args.part)
        return
    for part in PARTS:
        env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
        proc = subprocess.run([sys.executable, "-m", "benchmarks.memory", "--part",
                               json.dumps(part)], env=env, capture_output=True, text=True)
        if proc.returncode:
            sys.stderr.write(proc.stderr[-3000:])
            raise SystemExit(proc.returncode)
        print(proc.stdout.strip(), "\n", flush=True)


if __name__ == "__main__":
    main()
