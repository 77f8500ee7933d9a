"""One training loop, four ways to run it: a plain process, `meshscale launch`, a cluster
scheduler (SLURM, Kubernetes) through `jax.distributed`, or Ray Train's elastic JaxTrainer.

    python examples/ray_elastic.py --checkpoint-dir runs/ex                 # one process
    python examples/ray_elastic.py --checkpoint-dir runs/ex --steps 40 --p-min 1 --model mlp
    meshscale launch --processes 2 -- examples/ray_elastic.py --checkpoint-dir runs/ex
    srun python examples/ray_elastic.py --distributed --checkpoint-dir /shared/ex  # SLURM
    python examples/ray_elastic.py --ray --workers 1,4 --gpus-per-worker 8 \\
        --checkpoint-dir /shared/ex                                         # on a Ray cluster
    python examples/ray_elastic.py --ray --workers 1,2 --cpu-devices-per-worker 2 \\
        --checkpoint-dir runs/ex                                            # Ray, this machine

Whichever way it starts, the loop restores the latest checkpoint in --checkpoint-dir onto
the best mesh for the devices the job has now, so a restart with more or fewer workers
(Ray's elastic resize, a requeued SLURM job) continues where the last checkpoint left it.
The trainer is closed when the loop ends (``with``), so the last step is saved too.
"""

from __future__ import annotations

import argparse
import os

STEPS = 300
P_MIN = 2


def loop(config: dict) -> None:
    """The training loop: the same code in every way of running it."""
    import jax
    import optax
    from meshscale.models import registry

    from meshscale import CheckpointPolicy, ElasticTrainer, SearchSpace, SwitchPolicy, Trainer
    from meshscale.elastic import resources
    from meshscale.runtime import distributed

    model, batch_fn = registry.build(config.get("model", "gpt-tiny"), seed=0)
    steps = config.get("steps", STEPS)
    with ElasticTrainer(                                  # closed at the end: last step saved
            Trainer(model, optax.adam(3e-3), global_batch=24),
            checkpoint_dir=config["checkpoint_dir"],      # storage every worker sees
            resources=resources.Static(jax.device_count()),  # every device of every worker
            space=SearchSpace(p_min=config.get("p_min", P_MIN)),
            switching=SwitchPolicy(total_steps=steps),    # a switch must pay off before the end
            checkpoints=CheckpointPolicy(every=50)) as elastic:  # at most 50 steps lost
        state = elastic.init(batch_fn(24, 0))             # resumes onto the best mesh
        for i in range(int(state.step), steps):
            state, metrics = elastic.step(state, batch_fn(24, i))  # batch i: a function of i
            if config.get("ray") and (i + 1) % 10 == 0:   # every worker reports (a barrier)
                from meshscale.integrations import ray as meshscale_ray

                meshscale_ray.report(elastic, metrics, step=i + 1)
            elif distributed.is_main() and (i + 1) % 10 == 0:
                print(i + 1, float(metrics["loss"]), metrics["mesh"])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint-dir", required=True,
                        help="checkpoints (and the compile cache): storage every worker sees")
    parser.add_argument("--model", default="gpt-tiny",
                        help="gpt-tiny, gpt-small, llama-tiny or mlp (default gpt-tiny)")
    parser.add_argument("--steps", type=int, default=STEPS,
                        help=f"train until this step; a restart continues from its last "
                             f"checkpoint (default {STEPS})")
    parser.add_argument("--p-min", type=int, default=P_MIN,
                        help=f"fewest pipeline stages (memory: the model must fit on this "
                             f"many devices); the job needs at least this many devices "
                             f"(default {P_MIN})")
    parser.add_argument("--distributed", action="store_true",
                        help="one process per host: join them with jax.distributed (SLURM, "
                             "Kubernetes, Cloud TPU; automatic under meshscale launch)")
    parser.add_argument("--ray", action="store_true", help="run as a Ray Train JaxTrainer")
    parser.add_argument("--workers", default="1,4",
                        help="MIN,MAX Ray workers (elastic; default 1,4)")
    parser.add_argument("--gpus-per-worker", type=int, default=0,
                        help="GPUs each Ray worker takes (default 0: CPU)")
    parser.add_argument("--cpu-devices-per-worker", type=int, default=None,
                        help="simulated CPU devices per Ray worker (default: one)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    config = {"checkpoint_dir": args.checkpoint_dir, "model": args.model,
              "steps": args.steps, "p_min": args.p_min}
    if not args.ray:  # plain process, `meshscale launch`, SLURM, Kubernetes
        from meshscale.runtime import distributed
        from meshscale.runtime.launch import ENV_COORDINATOR

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
        config={"model": args.model, "steps": args.steps, "p_min": args.p_min, "ray": True})
    result = trainer.fit()
    print("finished:", result.error or "ok")


if __name__ == "__main__":
    main()
