"""The cost model: a candidate mesh's step time and per-device memory, predicted unrun.

A prediction is a sum of *terms*, each a count read off the schedule and the model times
a per-backend constant (seconds per unit):

- ``compute``: flops the busiest device executes per step. Ticks are lockstep
  (`meshscale.layout.schedule`), so a device runs ``ticks x slots`` layer applications of
  a microbatch, idle ticks and padding slots included, plus its share of embed and head
  (batch-sharded over every device). Flops per layer and per example come from XLA's
  ``cost_analysis()`` of one compiled layer (forward and backward), never from a formula.
- ``compute_shared``: the flops all devices execute together (bubble ticks skip their
  layers, padding slots do not): the cost on hardware whose devices share cores
  (simulated CPU devices), zero-weighted by fitting elsewhere.
- ``memory``: bytes the busiest device reads and writes (``cost_analysis()``'s
  ``bytes accessed`` per layer, scaled like ``compute``).
- ``link``: bytes one device sends: the stage input handed on every tick (``ppermute``,
  forward and backward), gradient reductions and FSDP gathers over ``data``.
- ``ticks`` / ``ticks_shared``: a fixed latency per lockstep tick (one device, all).
- ``fixed``: per step (launch, host feed).

The constants are fitted by non-negative least squares on relative error to try-runs
already measured (`fit`), pulled toward a prior where few measurements leave a term
unidentified (Aceso and Metis also rank a plan space with a profiled cost model before
running any; here the profile is the run's own try-runs). `CostModel` keeps the
observations and saves them as JSON with the run, so a later search starts calibrated.

Memory: the train state per device by the one sharding rule
(`Trainer.state_bytes_per_device`, from shapes alone), its gradients, plus activations:
``microbatches x repeats x slots`` stage inputs kept for the backward (remat per layer)
and one layer's temporaries (``memory_analysis()`` of the compiled layer).

Never: compile or run a whole train step, or allocate a model's arrays.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from scipy.optimize import nnls

from meshscale.layout.mesh import MeshShape
from meshscale.layout.schedule import Schedule
from meshscale.model.contract import call_layer, layer_inputs

TERMS = ("compute", "compute_shared", "memory", "link", "ticks", "ticks_shared", "fixed")
# Seconds per unit before any measurement: rough peak figures, only a prior to fit from.
PRIORS = {
    "cpu": (1 / 50e9, 1 / 100e9, 1 / 50e9, 1 / 10e9, 20e-6, 5e-6, 1e-3),
    "gpu": (1 / 400e12, 0.0, 1 / 2e12, 1 / 100e9, 20e-6, 0.0, 1e-3),
    "tpu": (1 / 400e12, 0.0, 1 / 1.5e12, 1 / 100e9, 10e-6, 0.0, 1e-3),
}
RIDGE = 1e-3  # weight of the prior against the measurements (in units of relative error)


@dataclasses.dataclass(frozen=True)
class Workload:
    """What one model costs, independent of the mesh (all per example unless named so).

    Attributes:
      num_layers: stacked units the pipe axis splits.
      global_batch: examples per step.
      layer_flops, layer_bytes: flops and bytes accessed by one layer's forward + backward
        (with the forward recomputed, as ``remat="layer"`` does) for one example.
      outer_flops, outer_bytes: the same for embed + head.
      activation_bytes: the stage input ``h`` of one example (what a tick hands on).
      layer_temp_bytes: one layer's temporaries for one example (its backward).
      layer_param_bytes: one layer's parameters; other_param_bytes: embed and head.
      state_bytes: per mesh shape, the train state per device (filled by `from_trainer`
        through the sharding rule; else params x (1 + opt_factor) spread over the mesh).
      opt_factor: optimizer state bytes per parameter byte.
      state_sharding: ``"replicate"``, ``"zero1"`` or ``"fsdp"``.
    """

    num_layers: int
    global_batch: int
    layer_flops: float
    layer_bytes: float
    outer_flops: float
    outer_bytes: float
    activation_bytes: float
    layer_temp_bytes: float
    layer_param_bytes: float
    other_param_bytes: float
    opt_factor: float = 2.0
    state_sharding: str = "fsdp"

    @classmethod
    def from_trainer(cls, trainer) -> Workload:
        """Measure `trainer`'s model: two small compiles on one device (a layer's and the
        embed + head's gradient, one example each), abstract inputs only."""
        cached = _WORKLOADS.get(id(trainer))
        if cached is not None and cached[0] is trainer:
            return cached[1]
        fm, state = trainer.fmodel, trainer.abstract_state()
        params = state.params
        nbytes = lambda tree: float(sum(x.size * jnp.dtype(x.dtype).itemsize
                                        for x in jax.tree.leaves(tree)))
        total = nbytes(params)
        blocks = nbytes(params["blocks"])
        one = jax.tree.map(lambda x: jax.ShapeDtypeStruct((1, *x.shape[1:]), x.dtype),
                           trainer.batch_spec)
        layer = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype),
                             params["blocks"])

        def outer(p, batch):
            model = fm.merge(p)
            h = model.embed(batch)
            out = model.head_loss(h, batch)
            return jnp.sum(jnp.asarray(out[0] if isinstance(out, tuple) else out))

        def embed(p, batch):
            model = fm.merge(p)
            return model.embed(batch), layer_inputs(model, batch)

        h, side = jax.eval_shape(embed, params, one)

        def layer_out(lp, x, s):
            return call_layer(fm.merge_layer(lp), x, s)

        layer_loss = lambda lp, x, s: jnp.sum(layer_out(lp, x, s))
        fwd = _analysed(layer_out, layer, h, side)
        grad = _analysed(jax.grad(layer_loss, argnums=(0, 1)), layer, h, side)
        out = _analysed(jax.grad(outer), params, one)
        made = cls(
            num_layers=trainer.num_layers, global_batch=trainer.global_batch,
            layer_flops=fwd[0] + grad[0], layer_bytes=fwd[1] + grad[1],
            outer_flops=out[0], outer_bytes=out[1],
            activation_bytes=float(h.size * jnp.dtype(h.dtype).itemsize),
            layer_temp_bytes=grad[2], layer_param_bytes=blocks / trainer.num_layers,
            other_param_bytes=total - blocks,
            opt_factor=nbytes(state.opt_state) / max(total, 1.0),
            state_sharding=trainer.state_sharding)
        # the sharding rule itself for the state (exact, from shapes), kept off the fields
        object.__setattr__(made, "_state_rule", trainer.state_bytes_per_device)
        _WORKLOADS[id(trainer)] = (trainer, made)
        return made

    def state_bytes(self, shape: MeshShape) -> float:
        """Train state bytes on the most loaded device of `shape`'s mesh."""
        rule = getattr(self, "_state_rule", None)
        if rule is not None:
            return float(rule(shape))
        sched = Schedule.of(shape, self.num_layers)
        params = sched.slots * sched.repeats * self.layer_param_bytes \
            + self.other_param_bytes / shape.pipe
        split = {"replicate": (1, 1), "zero1": (1, shape.data)}.get(
            self.state_sharding, (shape.data, shape.data))
        return params / split[0] + params * self.opt_factor / split[1]


_WORKLOADS: dict[int, tuple[object, Workload]] = {}  # id(trainer) -> (trainer, its workload)


def _analysed(fn, *args) -> tuple[float, float, float]:
    """(flops, bytes accessed, temp bytes) of `fn` compiled on one device for `args`."""
    compiled = jax.jit(fn).lower(*args).compile()
    costs = compiled.cost_analysis()
    costs = costs[0] if isinstance(costs, (list, tuple)) else (costs or {})
    stats = compiled.memory_analysis()
    temp = float(stats.temp_size_in_bytes) if stats is not None else 0.0
    return float(costs.get("flops", 0.0)), float(costs.get("bytes accessed", 0.0)), temp


def terms(shape: MeshShape, work: Workload) -> np.ndarray:
    """The counts each constant multiplies for `shape` (order of `TERMS`)."""
    sched = Schedule.of(shape, work.num_layers)
    n, d = shape.num_devices, shape.data
    micro = work.global_batch / (d * shape.microbatches)  # examples per microbatch
    runs = sched.ticks * sched.slots * micro  # layer applications x examples, lockstep
    own = work.global_batch / n  # embed and head are batch-sharded over every device
    compute = runs * work.layer_flops + own * work.outer_flops
    memory = runs * work.layer_bytes + own * work.outer_bytes
    stage_params = sched.slots * sched.repeats * work.layer_param_bytes
    handed = 2 * sched.ticks * micro * work.activation_bytes if shape.pipe > 1 else 0.0
    reduce = 2 * (d - 1) / d * (stage_params + work.other_param_bytes / shape.pipe)
    gather = 2 * (d - 1) / d * stage_params if work.state_sharding == "fsdp" else 0.0
    # all devices together execute only busy stage-ticks (bubble ticks skip the layers):
    # every example through every stored row, padding included
    executed = work.global_batch * (sched.rows * work.layer_flops + work.outer_flops)
    return np.array([compute, executed, memory, handed + reduce + gather,
                     sched.ticks, sched.ticks * n, 1.0])


def predict_memory(shape: MeshShape, work: Workload) -> float:
    """Bytes per device: state + gradients + kept stage inputs + one layer's temporaries."""
    sched = Schedule.of(shape, work.num_layers)
    micro = work.global_batch / (shape.data * shape.microbatches)
    grads = sched.slots * sched.repeats * work.layer_param_bytes \
        + work.other_param_bytes / shape.pipe
    if work.state_sharding == "fsdp":
        grads /= shape.data
    kept = shape.microbatches * shape.repeats * sched.slots * micro * work.activation_bytes
    temp = micro * work.layer_temp_bytes
    return work.state_bytes(shape) + grads + kept + temp


@dataclasses.dataclass(frozen=True)
class Constants:
    """Seconds per unit of each of `TERMS`, and how well they fit (`residual`: the rms
    relative error over the `fitted_from` measurements; nan when none)."""

    values: tuple[float, ...]
    fitted_from: int = 0
    residual: float = math.nan

    def seconds(self, counts: np.ndarray) -> float:
        return float(np.dot(self.values, counts))

    def as_dict(self) -> dict:
        return dict(zip(TERMS, self.values, strict=True))

    @classmethod
    def prior(cls, backend: str | None = None) -> Constants:
        backend = backend or jax.default_backend()
        return cls(PRIORS.get(backend, PRIORS["gpu"]))


def fit(counts: Sequence[np.ndarray], seconds: Sequence[float], *,
        prior: Constants | None = None, ridge: float = RIDGE) -> Constants:
    """Constants from measured step times: non-negative least squares on relative error,
    each column scaled to unit size, with a ridge of weight `ridge` toward `prior` (so
    terms the measurements cannot separate keep their prior share)."""
    prior = prior or Constants.prior()
    A = np.asarray(counts, dtype=float).reshape(-1, len(TERMS))
    y = np.asarray(seconds, dtype=float)
    if len(y) == 0:
        return prior
    rows = A / y[:, None]  # relative error: every measurement counts alike
    scale = np.maximum(np.abs(rows).max(axis=0), 1e-300)
    z0 = np.asarray(prior.values) * scale
    lhs = np.vstack([rows / scale, math.sqrt(ridge) * np.eye(len(TERMS))])
    rhs = np.concatenate([np.ones(len(y)), math.sqrt(ridge) * z0])
    z, _ = nnls(lhs, rhs, maxiter=50 * len(TERMS))
    values = z / scale
    err = A @ values / y - 1.0
    return Constants(tuple(float(v) for v in values), len(y),
                     float(np.sqrt(np.mean(err ** 2))))


@dataclasses.dataclass
class CostModel:
    """Measured (shape, counts, seconds) observations and the constants fitted to them.

    `observe` adds a try-run; `constants` refits; `save` / `load` keep the observations
    with the run (JSON), so the next search, or a restarted job, starts calibrated.
    """

    backend: str = dataclasses.field(default_factory=jax.default_backend)
    observations: list[tuple[str, list[float], float]] = dataclasses.field(default_factory=list)

    def observe(self, shape: MeshShape, work: Workload, seconds: float) -> None:
        if math.isfinite(seconds) and seconds > 0:
            self.observations.append((str(shape), terms(shape, work).tolist(), float(seconds)))

    def constants(self) -> Constants:
        prior = Constants.prior(self.backend)
        if not self.observations:
            return prior
        return fit([o[1] for o in self.observations], [o[2] for o in self.observations],
                   prior=prior)

    def save(self, path: str | os.PathLike) -> None:
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump({"backend": self.backend, "terms": list(TERMS),
                       "observations": self.observations,
                       "constants": self.constants().as_dict()}, f, indent=1)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> CostModel:
        """The model saved at `path`, or an empty one when there is none yet."""
        if not os.path.exists(path):
            return cls()
        with open(path) as f:
            data = json.load(f)
        if data.get("terms") != list(TERMS):  # another version's terms: start over
            return cls(backend=data.get("backend", jax.default_backend()))
        return cls(data["backend"], [tuple(o) for o in data["observations"]])
