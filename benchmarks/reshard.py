"""Cost of moving a train state to another mesh, next to the physical floor, in one run.

For a ResidualMLP state (params + Adam moments) of about 100 MB and 1 GB, on 8 simulated
CPU devices, from a 2x4 mesh to a 4x2 mesh:

1. in memory: `Trainer.place` seconds vs a numpy copy of the same bytes into a new
   buffer (target: ratio <= 3);
2. through a checkpoint: `Checkpointer.save` (+ wait) + `restore` seconds vs writing the
   same bytes to a raw file on the same disk (fsync'd) and reading them back
   (target: ratio <= 2);
3. what checksums cost: the same save and restore with ``checksums=False``, interleaved
   step by step with (2) (targets: save and restore each <= 1.15x without).

Run: ``python -m benchmarks.reshard [--sizes-mb 100 1000] [--repeats 3]``.
Reads come right after writes, so both the checkpoint restore and the raw-file read are
served from the page cache; neither measures the disk's read speed. Both ratios are of
interleaved rounds (place, copy, place, ...; save + restore, raw write + read, ...):
the median of the round ratios, with min and max.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

from benchmarks.common import interleaved, ratio, ratio_text, simulate_devices, table

simulate_devices(8)

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from meshscale.models.mlp import MLPConfig, ResidualMLP  # noqa: E402

from meshscale import Checkpointer, MeshShape, Trainer  # noqa: E402

SOURCE, TARGET = MeshShape(2, 4), MeshShape(4, 2)
LAYERS, FEATURES = 8, 512


def config_for(megabytes: float) -> MLPConfig:
    """An 8-layer MLP whose params + two Adam moments take about `megabytes` MB."""
    per_layer = megabytes * 1e6 / 3 / 4 / LAYERS  # float32 values per layer
    hidden = max(16, round(per_layer / (2 * FEATURES) / 64) * 64)
    return MLPConfig(num_layers=LAYERS, features=FEATURES, hidden=hidden)


def nbytes(tree) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(tree))


def device_bytes(tree) -> int:
    """Bytes actually held on devices (replicas counted once per device)."""
    return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards)


def raw_file_seconds(path: str, data: np.ndarray) -> tuple[float, float]:
    """Write `data` to `path` with fsync, then read it back: (write s, read s)."""
    start = time.perf_counter()
    with open(path, "wb") as f:
        f.write(memoryview(data))
        f.flush()
        os.fsync(f.fileno())
    written = time.perf_counter()
    back = np.empty_like(data)
    with open(path, "rb") as f:
        f.readinto(memoryview(back))
    read = time.perf_counter()
    assert back[-1] == data[-1]
    os.remove(path)
    return written - start, read - written


def measure(megabytes: float, repeats: int, workdir: str) -> dict:
    cfg = config_for(megabytes)
    trainer = Trainer(ResidualMLP(cfg, rngs=nnx.Rngs(0)), optax.adam(1e-3), global_batch=8)
    rng = np.random.default_rng(0)  # random moments too: zeros would flatter compression
    host = jax.tree.map(lambda a: rng.standard_normal(a.shape, dtype=np.float32)
                        if a.dtype == np.float32 else np.ones(a.shape, a.dtype),
                        trainer.abstract_state(SOURCE))
    state = jax.block_until_ready(jax.device_put(host, trainer.shardings(SOURCE)))
    del host
    logical = nbytes(state)

    def place():
        jax.block_until_ready(trainer.place(state, TARGET))

    placed = trainer.place(state, TARGET)
    physical = device_bytes(placed)
    del placed

    src = np.random.default_rng(0).integers(0, 255, logical, dtype=np.uint8)
    # Into a new buffer each time, as `place` fills new device buffers (page faults count).
    moves = interleaved({"place": place, "copy": lambda: src.copy()}, rounds=repeats)

    directory = os.path.join(workdir, f"ckpt-{megabytes:g}mb")
    saves, restores, writes, reads = [], [], [], []
    plain_saves, plain_restores = [], []

    def save_restore(ckpt, step):
        start = time.perf_counter()
        ckpt.save(state, step=step)
        ckpt.wait()
        saved = time.perf_counter()
        jax.block_until_ready(ckpt.restore(TARGET, step=step))
        return saved - start, time.perf_counter() - saved

    # Keep every step: deleting old ones (max_to_keep) is housekeeping, not the move.
    with Checkpointer(directory, trainer, max_to_keep=repeats + 1) as ckpt, \
            Checkpointer(directory + "-plain", trainer, max_to_keep=repeats + 1,
                         checksums=False) as plain:
        for step in range(repeats + 1):  # step 0 is a warm-up
            order = [ckpt, plain] if step % 2 else [plain, ckpt]  # interleaved
            timed = {id(c): save_restore(c, step) for c in order}
            w, r = raw_file_seconds(os.path.join(workdir, "raw.bin"), src)
            if step:
                saves.append(timed[id(ckpt)][0])
                restores.append(timed[id(ckpt)][1])
                plain_saves.append(timed[id(plain)][0])
                plain_restores.append(timed[id(plain)][1])
                writes.append(w)
                reads.append(r)
    shutil.rmtree(directory)
    shutil.rmtree(directory + "-plain")
    med = lambda xs: float(np.median(xs))
    return dict(cfg=cfg, logical=logical, physical=physical, place=med(moves["place"]),
                copy=med(moves["copy"]), place_ratio=ratio(moves["place"], moves["copy"]),
                save=med(saves), restore=med(restores), write=med(writes), read=med(reads),
                ckpt_ratio=ratio([a + b for a, b in zip(saves, restores, strict=True)],
                                 [a + b for a, b in zip(writes, reads, strict=True)]),
                sum_save=ratio(saves, plain_saves), sum_restore=ratio(restores, plain_restores))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mb", type=float, nargs="+", default=[100, 1000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="scratch directory (default: a temp dir)")
    args = parser.parse_args(argv)

    workdir = tempfile.mkdtemp(prefix="meshscale-reshard-", dir=args.dir)
    try:
        results = [measure(mb, args.repeats, workdir) for mb in args.sizes_mb]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    print(f"{SOURCE} -> {TARGET}, ResidualMLP {LAYERS} layers, Adam; jax {jax.__version__}, "
          f"{jax.device_count()} simulated {jax.devices()[0].platform} devices, "
          f"{os.cpu_count()} cores (load average {os.getloadavg()[0]:.1f}); scratch in "
          f"{os.path.dirname(workdir)}; median of {args.repeats}\n")
    rows = []
    for r in results:
        rows.append([f"{r['logical'] / 1e6:.0f} MB (hidden {r['cfg'].hidden})",
                     r["place"], r["copy"], ratio_text(r["place_ratio"]),
                     r["save"], r["restore"], r["write"], r["read"], ratio_text(r["ckpt_ratio"])])
    print(table(["state", "place s", "np copy s", "place/copy (<=3)", "ckpt save s",
                 "ckpt restore s", "raw write+fsync s", "raw read s", "ckpt/raw (<=2)"], rows))
    for r in results:
        print(f"\n{r['logical'] / 1e6:.0f} MB state: the 4x2 copy holds "
              f"{r['physical'] / 1e6:.0f} MB on devices (copies over data counted); "
              f"place / copy of those bytes = "
              f"{r['place'] / (r['copy'] * r['physical'] / r['logical']):.2f}")
    print("\nChecksums (recorded at save, verified at restore) against checksums=False, "
          "interleaved:\n")
    print(table(["state", "save with / without (<=1.15)", "restore with / without (<=1.15)"],
                [[f"{r['logical'] / 1e6:.0f} MB", ratio_text(r["sum_save"]),
                  ratio_text(r["sum_restore"])] for r in results]))
    print("\nReads follow writes, so the restore and the raw read both come from the page "
          "cache.")


if __name__ == "__main__":
    main()
