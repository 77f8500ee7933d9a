"""One training loop, four ways to run it: a plain process, `meshscale launch`, a cluster
scheduler (SLURM, Kubernetes) through `jax.distributed`, or Ray Train's elastic JaxTrainer.

    python examples/ray_elastic.py --checkpoint-dir runs/ex                 # one process
    meshscale launch --processes 2 -- examples/ray_elastic.py --checkpoint-dir runs/ex
    srun python examples/ray_elastic.py --distributed --checkpoint-dir /shared/ex  # SLURM
    python examples/ray_elastic.py --ray --workers 1,4 --gpus-per-worker 8 \\
        --checkpoint-dir /shared/ex                                         # on a Ray cluster
    python examples/ray_elastic.py --ray --workers 1,2 --cpu-devices-per-worker 2 \\
        --checkpoint-dir runs/ex                                            # Ray, this machine

Whichever way it starts, the loop restores the latest checkpoint in --checkpoint-dir onto
the best mesh for the devices the job has now, so a restart with more or fewer workers
(Ray's elastic resize, a requeued SLURM job) continues where the last checkpoint left it.
"""

from __future__ import annotations

import argparse
import os

STEPS = 300


def loop(config: dict) -> None:
    """The training loop: the same code in every way of running it."""
    import jax
    import optax

    from meshscale import ElasticTrainer, distributed, resources
    from models import registry

    model, batch_fn = registry.build(config.get("model", "gpt-tiny"), seed=0)
    elastic = ElasticTrainer(
        model, optax.adam(3e-3), global_batch=24, p_min=2,
        checkpoint_dir=config["checkpoint_dir"],          # storage every worker sees
        resources=resources.Static(jax.device_count()),   # every device of every worker
        checkpoint_every=50, total_steps=STEPS)           # at most 50 steps lost at a restart
    state = elastic.init(batch_fn(24, 0))                 # resumes onto the best mesh
    for i in range(int(state.step), STEPS):
        state, metrics = elastic.step(state, batch_fn(24, i))  # batch i: a function of i
        if config.get("ray") and (i + 1) % 10 == 0:       # every worker reports (a barrier)
            from meshscale.integrations import ray as meshscale_ray

            meshscale_ray.report(elastic, metrics, step=i + 1)
        elif distributed.is_main() and (i + 1) % 10 == 0:
            print(i + 1, float(metrics["loss"]), metrics["mesh"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint-dir", required=True)
    parser.add_argument("--model", default="gpt-tiny")
    parser.add_argument("--distributed", action="store_true",
                        help="one process per host: join them with jax.distributed (SLURM, "
                             "Kubernetes, Cloud TPU; automatic under meshscale launch)")
    parser.add_argument("--ray", action="store_true", help="run as a Ray Train JaxTrainer")
    parser.add_argument("--workers", default="1,4", help="MIN,MAX Ray workers (elastic)")
    parser.add_argument("--gpus-per-worker", type=int, default=0)
    parser.add_argument("--cpu-devices-per-worker", type=int, default=None)
    args = parser.parse_args()
    config = {"checkpoint_dir": args.checkpoint_dir, "model": args.model}
    if not args.ray:  # plain process, `meshscale launch`, SLURM, Kubernetes
        from meshscale import distributed
        from meshscale.launch import ENV_COORDINATOR

        if args.distributed or os.environ.get(ENV_COORDINATOR):
            distributed.initialize()
        loop(config)
        return
    import ray

    from meshscale.integrations import ray as meshscale_ray

    ray.init()  # the cluster this machine belongs to (`ray start`), or a local one
    low, high = (int(v) for v in args.workers.split(","))
    trainer = meshscale_ray.jax_trainer(
        loop, checkpoint_dir=args.checkpoint_dir, num_workers=(low, high),
        use_gpu=args.gpus_per_worker > 0,
        resources_per_worker={"GPU": args.gpus_per_worker} if args.gpus_per_worker else None,
        cpu_devices_per_worker=args.cpu_devices_per_worker,
        config={"model": args.model, "ray": True})
    result = trainer.fit()
    print("finished:", result.error or "ok")


if __name__ == "__main__":
    main()
