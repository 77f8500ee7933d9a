"""Pipeline schedules side by side: per-device temporaries and counted bubbles (#24).

1. Temporaries per device (XLA `compiled.memory_analysis()`, the loss and its gradient
   compiled abstractly, nothing allocated) of GPipe (`model.pipeline`) and the 1F1B and
   zero-bubble prototypes (`model.schedule_1f1b`) on the same mesh, state and batch: at
   a fixed global batch with ``M = p`` and ``M = 4 p`` microbatches (target: 1f1b and zb
   <= 0.5x GPipe at 4p), and at a fixed microbatch size from ``M = p`` to ``4 p``
   (target: within 1.15x).
   GPT tiny on 4x2 and 8x1; ``--llama`` adds Llama-3-8B shapes (slow to compile).
2. Idle stage-slots counted from the slot tables (`layout.schedule`) against the
   formulas, and the most stage inputs a stage holds, for GPipe, 1F1B and zero-bubble.

Run: ``python -m benchmarks.schedules [--llama]``.
"""

from __future__ import annotations

import argparse
import dataclasses

from benchmarks.common import simulate_devices, table

MiB = 2**20
KINDS = ("gpipe", "1f1b", "zb")


def temporaries(model, shape, kind: str, global_batch: int, mode: str = "fsdp") -> int:
    """Temporary bytes per device of ``value_and_grad`` of `kind`'s loss on `shape`."""
    import jax
    from flax import nnx
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from meshscale.layout import sharding
    from meshscale.layout.mesh import make_mesh
    from meshscale.layout.schedule import Schedule
    from meshscale.model.contract import FunctionalModel
    from meshscale.model.pipeline import pipeline_loss
    from meshscale.model.schedule_1f1b import schedule_loss

    fmodel, params = FunctionalModel.of(model)
    mesh = make_mesh(shape)
    rows = Schedule.of(shape, fmodel.num_layers).rows
    stored = sharding.stored_params(fmodel.abstract_params(), mesh_shape=shape,
                                    num_layers=fmodel.num_layers, rows=rows, mode=mode)
    specs = sharding.state_specs(stored, None, mesh_shape=shape,
                                 num_layers=fmodel.num_layers, mode=mode)[0]
    make = pipeline_loss if kind == "gpipe" else schedule_loss
    shape = dataclasses.replace(shape, schedule=kind)
    loss = make(fmodel, shape, mesh, global_batch=global_batch, state_sharding=mode,
                stored=stored, specs=specs)
    place = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype,  # noqa: E731
                                              sharding=NamedSharding(mesh, s))
    args = jax.tree.map(place, stored, specs)
    example = nnx.eval_shape(lambda: model.example_batch(global_batch))
    batch = jax.tree.map(lambda x: place(x, P("data")), example)
    compiled = jax.jit(jax.value_and_grad(loss)).lower(args, batch).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def memory_table(name: str, model, meshes: list[tuple[int, int]], batch: int,
                 micro_rows: int) -> str:
    from meshscale import MeshShape

    out, seen = [], {}
    for pipe, data in meshes:
        fixed = {}
        for m in (pipe, 4 * pipe):
            # the same global batch at M = p and 4p; then a fixed microbatch size
            for label, b in (("batch", batch), ("micro", data * m * micro_rows)):
                shape = MeshShape(pipe, data, m)
                for k in KINDS:
                    if (shape, k, b) not in seen:
                        seen[shape, k, b] = temporaries(model, shape, k, b)
                fixed[label, m] = {k: seen[shape, k, b] for k in KINDS}
        for m in (pipe, 4 * pipe):
            g = fixed["batch", m]["gpipe"]
            for k in KINDS[1:]:
                o = fixed["batch", m][k]
                out.append([f"{pipe}x{data}/m{m}", f"batch {batch}: {k} / gpipe",
                            f"{g / MiB:.1f}", f"{o / MiB:.1f}", f"{o / g:.3f}"])
        for k in KINDS:
            lo, hi = fixed["micro", pipe][k], fixed["micro", 4 * pipe][k]
            out.append([f"{pipe}x{data}", f"{micro_rows} rows/microbatch, {k}: M=p -> 4p",
                        f"{lo / MiB:.1f}", f"{hi / MiB:.1f}", f"{hi / lo:.3f}"])
    return f"{name}\n\n" + table(["mesh", "case", "GPipe (or M=p) MiB",
                                  "schedule (or M=4p) MiB", "ratio"], out)


def bubble_table() -> str:
    from meshscale.layout.schedule import SCHEDULES, bubble_formula, slot_table

    out = []
    for p in (2, 4, 8):
        for m in (p, 4 * p):
            for kind in SCHEDULES:
                t = slot_table(kind, p, m)
                out.append([kind, p, m, t.slots, t.idle_stage_slots(),
                            f"{t.counted_bubble():.4f}", f"{bubble_formula(kind, p, m):.4f}",
                            f"{(p - 1) / (3 * m) + 1 / m:.4f}" if kind == "zb" else "",
                            " ".join(str(int(x)) for x in t.in_flight().max(0))])
    return table(["schedule", "p", "M", "slots", "idle stage-slots", "counted bubble",
                  "formula", "zb target", "max inputs held, stage 0..p-1"], out)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--llama", action="store_true", help="add Llama-3-8B shapes")
    args = parser.parse_args()
    simulate_devices(8)
    from flax import nnx
    from meshscale.models.gpt import GPT, GPTConfig

    print(bubble_table(), "\n", flush=True)
    gpt = GPT(GPTConfig.preset("tiny"), rngs=nnx.Rngs(0))
    print(memory_table("GPT tiny (fsdp, float32)", gpt, [(4, 2), (8, 1)], batch=256,
                       micro_rows=8), "\n", flush=True)
    if args.llama:
        from meshscale.models.llama import Llama, LlamaConfig

        cfg = dataclasses.replace(LlamaConfig.preset("8b"), seq_len=1024)
        llama = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
        print(memory_table("Llama-3-8B shapes, seq 1024 (fsdp, float32)", llama,
                           [(4, 2), (8, 1)], batch=256, micro_rows=8), flush=True)


if __name__ == "__main__":
    main()
