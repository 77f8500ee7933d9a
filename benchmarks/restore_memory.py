"""Host memory of a checkpoint restore, against the bytes of the process's own shards.

A ResidualMLP state (params + Adam moments, random values) of about `--size-mb` MB is
saved from a 2x4 mesh of 8 simulated CPU devices, then restored in a fresh process onto
each target mesh (GPipe and circular, whose stacks are read layer-major and re-stacked
leaf by leaf, `meshscale.layout.stacking`). The child reads its resident set before the
restore, its peak and what it keeps after (``VmRSS``, ``VmHWM`` from /proc/self/status;
"kept" again after ``malloc_trim``, which hands freed heap back to the OS), compared
with the bytes of the restored shards this process holds (on simulated CPU
devices those live in host memory too, so the ideal peak growth is 1.0x: the shards
and nothing else). Run: ``python -m benchmarks.restore_memory [--size-mb 1000]``.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import subprocess
import sys
import tempfile

SOURCE = "2x4/m4"
TARGETS = ["2x4/m4", "4x2/m4", "2x4/m4/r2", "4x2/m4/r2"]


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _trainer(size_mb: float):
    import optax
    from flax import nnx
    from meshscale.models.mlp import ResidualMLP

    from benchmarks.reshard import config_for
    from meshscale import Trainer

    return Trainer(lambda: ResidualMLP(config_for(size_mb), rngs=nnx.Rngs(0)),
                   optax.adam(1e-3), global_batch=32)


def _save(directory: str, size_mb: float) -> None:
    import jax
    import numpy as np

    from meshscale import Checkpointer, MeshShape

    trainer, shape = _trainer(size_mb), MeshShape.parse(SOURCE)
    rng = np.random.default_rng(0)
    host = jax.tree.map(lambda a: rng.standard_normal(a.shape, dtype=np.float32)
                        if a.dtype == np.float32 else np.ones(a.shape, a.dtype),
                        trainer.abstract_state(shape))
    with Checkpointer(directory, trainer) as ckpt:
        ckpt.save(jax.device_put(host, trainer.shardings(shape)), shape=shape)
        ckpt.wait()


def _restore(directory: str, size_mb: float, target: str) -> dict:
    import jax

    from meshscale import Checkpointer, MeshShape

    trainer, shape = _trainer(size_mb), MeshShape.parse(target)
    ckpt = Checkpointer(directory, trainer)
    trainer.targets(shape)  # the layout, before the measured part
    before = _status_kib("VmRSS")
    state = jax.block_until_ready(ckpt.restore(shape))
    peak, after = _status_kib("VmHWM"), _status_kib("VmRSS")
    own = sum(s.data.nbytes for x in jax.tree.leaves(state) for s in x.addressable_shards)
    ckpt.close()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed heap back to the OS: what is live
    trimmed = _status_kib("VmRSS")
    mb = lambda kib: kib * 1024 / 1e6
    return {"target": target, "own_mb": own / 1e6, "peak_mb": mb(peak - before),
            "kept_mb": mb(after - before), "live_mb": mb(trimmed - before),
            "start_mb": mb(before)}


def _child(args: argparse.Namespace) -> None:
    from benchmarks.common import simulate_devices

    simulate_devices(8)
    if args.target is None:
        _save(args.dir, args.size_mb)
    else:
        print(json.dumps(_restore(args.dir, args.size_mb, args.target)))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, default=1000)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    parser.add_argument("--target", help=argparse.SUPPRESS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args)
        return
    from benchmarks.common import table

    workdir = tempfile.mkdtemp(prefix="meshscale-restore-mem-")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    run = lambda *extra: subprocess.run(
        [sys.executable, "-m", "benchmarks.restore_memory", "--child", "--dir", workdir,
         "--size-mb", str(args.size_mb), *extra], env=env, capture_output=True, text=True,
        check=True).stdout
    try:
        run()
        rows = []
        for target in TARGETS:
            r = json.loads(run("--target", target).strip().splitlines()[-1])
            rows.append([f"{SOURCE} -> {r['target']}", round(r["own_mb"]), round(r["peak_mb"]),
                         round(r["peak_mb"] / r["own_mb"], 2), round(r["kept_mb"]),
                         round(r["live_mb"]), round(r["start_mb"])])
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"ResidualMLP state of about {args.size_mb:g} MB (params + Adam), saved from "
          f"{SOURCE}, restored in a fresh process on 8 simulated CPU devices:\n")
    print(table(["restore", "own shards MB", "peak RSS growth MB", "peak / own shards",
                 "RSS kept MB", "kept after malloc_trim MB", "RSS before MB"], rows))


if __name__ == "__main__":
    main()
