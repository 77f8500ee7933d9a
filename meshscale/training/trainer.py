"""Train state, its placement on a mesh, and the compiled train step.

`Trainer` knows one model, one optimizer and one global batch size; for any `MeshShape`
it gives the state's shardings, a fresh state, the state moved onto that mesh, and an
ahead-of-time compiled step. The global batch is the same on every mesh, so the training
math does not depend on the mesh: only where it runs does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from meshscale.errors import (
    ContractError,
    InsufficientDevices,
    InvalidArgument,
    InvalidBatch,
    InvalidMeshShape,
)
from meshscale.layout import padding, schedule, sharding
from meshscale.layout.mesh import MeshShape, device_ids, make_mesh
from meshscale.layout.placement import move_tree
from meshscale.model import rng as rng_lib
from meshscale.model import schedule_1f1b
from meshscale.model.contract import Batch, FunctionalModel, Params
from meshscale.model.pipeline import Remat, check_remat, pipeline_loss
from meshscale.training.compile_cache import CompileCache
from meshscale.training.mesh_layout import MeshLayout
from meshscale.training.state import TrainState, from_host

Devices = Sequence[jax.Device] | None


class Trainer:
    """One model + optimizer + global batch, trainable on any valid mesh shape.

    Args:
      model: a Flax NNX module following `meshscale.model.contract`'s contract, or a constructor
        (a callable taking no arguments and returning one). A concrete module's
        parameters as constructed are the starting point on every mesh; a constructor is
        run under `jax.jit` straight onto each mesh, so no device or host ever holds the
        whole model (the values equal the eagerly constructed model's). An abstract
        module (`nnx.eval_shape`) compiles and restores checkpoints but cannot start
        from scratch.
      optimizer: an optax `GradientTransformation`.
      global_batch: examples per step, fixed across meshes.
      example_batch: one batch (or its `jax.ShapeDtypeStruct`s) fixing the batch structure;
        defaults to `model.example_batch(global_batch)`.
      state_sharding: where parameters and optimizer state live besides their stage
        (`meshscale.layout.sharding`): ``"replicate"`` (copied over ``data``), ``"zero1"``
        (optimizer state split over ``data``) or ``"fsdp"`` (parameters split over
        ``data`` too, gathered per stage for compute). Embedding and head are split over
        ``pipe`` in every mode.
      remat: what each tick keeps for the backward pass (`meshscale.model.pipeline.Remat`):
        ``"layer"`` (default: each layer's input; the backward recomputes one layer at a
        time), ``"stage"`` (only the stage's input; the backward holds a whole stage's
        activations at once) or ``"none"`` (everything).
      compute_dtype: mixed precision: the forward and backward passes run with the
        floating parameters cast to this dtype (e.g. ``jnp.bfloat16``), while the
        parameters, their gradients and the optimizer state stay in their own dtype
        (float32 master weights) and the loss and its reduction are float32. None: no
        cast. The one-device reference is the same cast (`meshscale.model.contract.cast_floats`).
      rng_seed: turn on randomness in layers (dropout): every layer gets ``rng=`` keys,
        one per example, derived from (seed, step, example, layer) (`meshscale.model.rng`), so
        a step draws the same on every mesh. None: layers get no keys.
      donate: let the compiled step reuse the input state's buffers (the state passed to a
        step must not be used again).
      skip_nonfinite: a step whose loss or gradient norm is nan or inf leaves parameters
        and optimizer state as they were (decided on the device, no host sync; the step
        counter still advances). Every step reports ``loss`` and ``grad_norm``.
      cache: where compiled steps are kept (shared with try-runs).
    """

    def __init__(self, model: nnx.Module | Callable[[], nnx.Module],
                 optimizer: optax.GradientTransformation, *, global_batch: int,
                 example_batch: Batch | None = None,
                 state_sharding: sharding.StateSharding = "fsdp", remat: Remat | bool = "layer",
                 compute_dtype: Any = None, rng_seed: int | None = None, donate: bool = True,
                 skip_nonfinite: bool = False, cache: CompileCache | None = None):
        self._constructor = None
        if not isinstance(model, nnx.Module):
            if not callable(model):
                raise ContractError(f"{type(model).__name__} is not a flax.nnx.Module nor a "
                                    "constructor returning one: subclass meshscale.LayerStack")
            self._constructor = model
            model = nnx.eval_shape(model)
        self.fmodel, params = FunctionalModel.of(model)
        self.num_layers = self.fmodel.num_layers
        concrete = all(isinstance(x, jax.Array) for x in jax.tree.leaves(params))
        # The as-constructed parameters (device arrays, not a host copy), or None.
        self.initial_params = params if concrete and self._constructor is None else None
        self.optimizer = optimizer
        if not isinstance(global_batch, int) or global_batch < 1:
            raise InvalidArgument(f"global_batch must be a positive int, got {global_batch!r}")
        self.global_batch = global_batch
        self.state_sharding = sharding.check_state_sharding(state_sharding)
        self.remat = check_remat(remat)
        self.compute_dtype = None if compute_dtype is None else jnp.dtype(compute_dtype)
        if self.compute_dtype is not None and not jnp.issubdtype(self.compute_dtype,
                                                                 jnp.floating):
            raise InvalidArgument(f"compute_dtype must be a float dtype, got {compute_dtype}")
        if rng_seed is not None and not isinstance(rng_seed, int):
            raise InvalidArgument(f"rng_seed must be an int or None, got {rng_seed!r}")
        self.rng_seed = rng_seed
        self._name = type(model).__name__
        self._batch_spec = None
        if example_batch is None and hasattr(model, "example_batch"):
            example_batch = jax.eval_shape(lambda: model.example_batch(global_batch))
        if example_batch is not None:
            self.set_example_batch(example_batch)
        self.donate = donate
        self.skip_nonfinite = bool(skip_nonfinite)
        self.cache = cache if cache is not None else CompileCache()
        self.fingerprint = self.fmodel.fingerprint()
        self._layouts: dict[tuple, MeshLayout] = {}
        self._stored_cache: dict[MeshShape, tuple[TrainState, TrainState]] = {}

    @property
    def batch_spec(self) -> Batch:
        """The batch's `jax.ShapeDtypeStruct`s (from `example_batch`)."""
        if self._batch_spec is None:
            raise ContractError(
                "the batch structure is not known yet: pass example_batch= to Trainer, give "
                "the model an example_batch(n) method, or call ElasticTrainer.init(batch)")
        return self._batch_spec

    @property
    def knows_batch(self) -> bool:
        return self._batch_spec is not None

    def set_example_batch(self, example_batch: Batch) -> None:
        """Fix the batch structure from one batch (arrays or `ShapeDtypeStruct`s) and check
        the model's forward on it abstractly (`FunctionalModel.check_forward`)."""
        spec = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), example_batch)
        for leaf in jax.tree.leaves(spec):
            if not leaf.shape or leaf.shape[0] != self.global_batch:
                raise ContractError(
                    f"every batch leaf needs leading axis global_batch={self.global_batch}, "
                    f"got shape {leaf.shape}")
        self.fmodel.check_forward(spec, self._name, rng=self.rng_seed is not None)
        self._batch_spec = spec

    def check_batch(self, batch: Batch) -> None:
        """Raise `InvalidBatch` (one line: the leaf, what was expected, `global_batch`)
        unless `batch` has the structure, shapes and dtypes the step was compiled for.
        With several processes a batch may also hold only this process's rows."""
        spec = self.batch_spec
        expected = jax.tree_util.tree_flatten_with_path(spec)
        got, got_tree = jax.tree.flatten(batch)
        if got_tree != expected[1]:
            raise InvalidBatch(
                f"batch structure {got_tree} differs from the one the step was compiled for, "
                f"{expected[1]}: pass batches shaped like example_batch")
        for (path, want), x in zip(expected[0], got, strict=True):
            shape = tuple(np.shape(x))
            dtype = jax.dtypes.canonicalize_dtype(getattr(x, "dtype", None)
                                                  or np.asarray(x).dtype)
            rows_ok = shape[:1] == want.shape[:1] or jax.process_count() > 1
            if not rows_ok or shape[1:] != want.shape[1:] or \
                    dtype != jax.dtypes.canonicalize_dtype(want.dtype):
                raise InvalidBatch(
                    f"batch leaf {jax.tree_util.keystr(path) or '(root)'} is {dtype.name}"
                    f"{list(shape)}, the step was compiled for {want.dtype.name}"
                    f"{list(want.shape)}: every leaf needs global_batch={self.global_batch} "
                    "rows and the example batch's trailing shape and dtype")

    # -- validity ---------------------------------------------------------------------
    def check(self, shape: MeshShape, devices: Devices = None) -> None:
        """Raise (one line, naming the fix) unless `shape` can run on `devices`."""
        n = len(jax.devices() if devices is None else devices)
        if shape.num_devices > n:
            raise InsufficientDevices(
                f"mesh {shape.pipe}x{shape.data} needs {shape.num_devices} devices, only {n} "
                f"available: choose pipe * data <= {n}")
        schedule.check(shape, self.num_layers)
        per_step = shape.data * shape.microbatches
        if self.global_batch % per_step:
            raise InvalidMeshShape(
                f"global batch {self.global_batch} is not divisible by data * microbatches = "
                f"{shape.data} * {shape.microbatches}: change the batch, data or microbatches")
        if shape.schedule != "gpipe":  # what the 1f1b / zb loss runs (a prototype)
            schedule_1f1b.check(self.fmodel, shape, self.global_batch, self.remat)

    # -- placement --------------------------------------------------------------------
    def mesh(self, shape: MeshShape, devices: Devices = None) -> jax.sharding.Mesh:
        return self.layout(shape, devices).mesh

    def layout(self, shape: MeshShape, devices: Devices = None) -> MeshLayout:
        """Everything about the state on `shape`'s mesh over `devices` (`MeshLayout`:
        mesh, stored abstract state, specs, shardings, restore targets, batch rows),
        computed once per mesh and cached: every reader sees the same decision."""
        self.check(shape, devices)
        devs = jax.devices() if devices is None else devices
        key = (shape, device_ids(devs[: shape.num_devices]))
        if key not in self._layouts:
            abstract, specs = self._stored(shape)
            self._layouts[key] = MeshLayout.build(
                shape, make_mesh(shape, devices), abstract, specs,
                sharding.rows_spec(shape, self.global_batch))
        return self._layouts[key]

    def _stored(self, shape: MeshShape) -> tuple[TrainState, TrainState]:
        """(abstract state as stored on `shape`'s mesh, its `PartitionSpec`s), cached."""
        if shape not in self._stored_cache:
            params = sharding.stored_params(
                self.fmodel.abstract_params(), mesh_shape=shape, num_layers=self.num_layers,
                rows=self.rows(shape), mode=self.state_sharding)
            abstract = TrainState(jax.ShapeDtypeStruct((), jnp.int32), params,
                                  jax.eval_shape(self.optimizer.init, params))
            param_specs, opt_specs = sharding.state_specs(
                abstract.params, abstract.opt_state, mesh_shape=shape,
                num_layers=self.num_layers, mode=self.state_sharding)
            self._stored_cache[shape] = (abstract, TrainState(P(), param_specs, opt_specs))
        return self._stored_cache[shape]

    def abstract_state(self, shape: MeshShape | None = None) -> TrainState:
        """Shapes and dtypes of the train state (no shardings, nothing allocated).

        On `shape`'s mesh, as stored there (`meshscale.layout.padding`): the layer stack
        padded with zero rows to `Schedule.rows`, and a large leaf no dimension of which
        the pipe width divides padded until one does. Without a shape: the model's own.
        """
        if shape is not None:
            return self._stored(shape)[0]
        params = self.fmodel.abstract_params()
        return TrainState(jax.ShapeDtypeStruct((), jnp.int32), params,
                          jax.eval_shape(self.optimizer.init, params))

    def rows(self, shape: MeshShape) -> int:
        """The block leaves' leading length on `shape`'s mesh (`Schedule.rows`)."""
        return schedule.Schedule.of(shape, self.num_layers).rows

    def model_params(self, params: Params) -> Params:
        """`params` from any mesh with the zero padding dropped (`meshscale.layout.padding`):
        the model's own parameter shapes (to evaluate, export or compare runs)."""
        return padding.cut(params, self.fmodel.abstract_params())

    def unpadded_state(self, state: TrainState) -> TrainState:
        """`state` from any mesh with the zero padding dropped, optimizer state included."""
        return padding.cut(state, self.abstract_state())

    def specs(self, shape: MeshShape) -> TrainState:
        """The `PartitionSpec` of every train-state leaf on `shape` (`layout.sharding`)."""
        return self._stored(shape)[1]

    def shardings(self, shape: MeshShape, devices: Devices = None) -> TrainState:
        """The `NamedSharding` of every train-state leaf on `shape`'s mesh."""
        return self.layout(shape, devices).shardings

    def targets(self, shape: MeshShape, devices: Devices = None) -> TrainState:
        """`abstract_state(shape)` with `shardings`: where a placed or restored state goes."""
        return self.layout(shape, devices).targets

    def state_bytes_per_device(self, shape: MeshShape) -> int:
        """Bytes of the train state on the most loaded device of `shape`'s mesh."""
        abstract, specs = self.abstract_state(shape), self.specs(shape)
        sizes = {"pipe": shape.pipe, "data": shape.data}

        def local(x, spec):
            n = int(np.prod(x.shape, dtype=np.int64)) * jnp.dtype(x.dtype).itemsize
            for entry in spec:
                for name in (entry if isinstance(entry, tuple) else (entry,)):
                    n //= sizes.get(name, 1)
            return n

        return sum(jax.tree.leaves(jax.tree.map(
            local, abstract, specs, is_leaf=lambda x: isinstance(x, P))))

    def batch_sharding(self, shape: MeshShape, devices: Devices = None) -> Any:
        return self.layout(shape, devices).batch_shardings(self.batch_spec)

    def init_state(self, shape: MeshShape, devices: Devices = None) -> TrainState:
        """A fresh state on `shape`'s mesh, from the model's parameters as constructed.

        From a constructor the parameters are created directly in their shards.
        """
        shardings = self.shardings(shape, devices)
        stored = self.abstract_state(shape).params
        pad = lambda params: padding.pad(params, stored, self.num_layers)
        if self._constructor is not None:
            make = lambda: pad(nnx.to_pure_dict(nnx.state(self._constructor(), nnx.Param)))
            params = jax.jit(make, out_shardings=shardings.params)()
        elif self.initial_params is not None and jax.process_count() == 1:
            # Copied, not placed: a donated step must never delete the model's own arrays.
            params = jax.jit(lambda t: pad(jax.tree.map(jnp.copy, t)),
                             out_shardings=shardings.params)(self.initial_params)
        elif self.initial_params is not None:
            params = from_host(jax.device_get(pad(self.initial_params)), shardings.params)
        else:
            raise ContractError(
                "this Trainer was built from an abstract model, which has no initial values: "
                "pass the model's constructor (e.g. lambda: Model(cfg, rngs=nnx.Rngs(0))) "
                "or restore a checkpoint")
        opt_state = jax.jit(self.optimizer.init, out_shardings=shardings.opt_state)(params)
        step = from_host(np.zeros((), np.int32), shardings.step)
        return TrainState(step, params, opt_state)

    def place(self, state: TrainState, shape: MeshShape, devices: Devices = None) -> TrainState:
        """`state` moved onto `shape`'s mesh in memory (values unchanged, bit for bit; the
        zero padding follows the target mesh's, `meshscale.layout.padding`).

        Leaves whose placement already matches are returned as they are (not copied).
        """
        return move_tree(state, self.targets(shape, devices), self.num_layers)

    def put_batch(self, batch: Batch, shape: MeshShape, devices: Devices = None, *,
                  shardings: Any = None) -> Batch:
        """A batch split over the ``data`` axis, from host or device arrays.

        `batch` is the global batch, or, when the mesh spans several processes, either
        the global batch (the same on every process; each keeps only its rows) or just
        this process's rows, ``batch[local_rows(shape, devices)]``. `shardings`: the
        `batch_sharding` kept by a caller that steps many times (not rebuilt per step).
        """
        shardings = shardings or self.batch_sharding(shape, devices)
        if jax.process_count() == 1:
            return jax.device_put(batch, shardings)
        return jax.tree.map(
            lambda x, s: jax.make_array_from_process_local_data(
                s, np.asarray(x), (self.global_batch, *np.shape(x)[1:])), batch, shardings)

    def local_rows(self, shape: MeshShape, devices: Devices = None) -> slice:
        """The global batch rows this process's devices hold on `shape`'s mesh.

        Every row with one process; with several, a process that loads only its share
        passes ``batch[local_rows(...)]`` to `put_batch`. Empty when no device is local.
        """
        rows_sharding = jax.tree.leaves(self.batch_sharding(shape, devices))[0]
        rows = [i[0].indices(self.global_batch)[:2] for i in
                rows_sharding.addressable_devices_indices_map((self.global_batch,)).values()]
        return slice(min(r[0] for r in rows), max(r[1] for r in rows)) if rows else slice(0, 0)

    # -- computation ------------------------------------------------------------------
    def loss_fn(self, shape: MeshShape, devices: Devices = None):
        """The pipelined ``(params, batch) -> loss`` on `shape`'s mesh (differentiable);
        the stored shapes and specs are the layout's (`Trainer.layout`), never re-derived."""
        layout = self.layout(shape, devices)
        make = pipeline_loss if shape.schedule == "gpipe" else schedule_1f1b.schedule_loss
        return make(self.fmodel, shape, layout.mesh, global_batch=self.global_batch,
                    remat=self.remat, compute_dtype=self.compute_dtype,
                    stored=layout.abstract.params, specs=layout.specs.params)

    def _train_step(self, shape: MeshShape, devices: Devices):
        loss_fn = self.loss_fn(shape, devices)

        def train_step(state: TrainState, batch: Batch):
            rng = rng_lib.step_key(self.rng_seed, state.step)
            loss, grads = jax.value_and_grad(loss_fn)(state.params, batch, rng)
            grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
            updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
            if self.skip_nonfinite:  # keep the old values: a select, no host sync
                finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
                params, opt_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                                                 (params, opt_state),
                                                 (state.params, state.opt_state))
            return (TrainState(state.step + 1, params, opt_state),
                    {"loss": loss, "grad_norm": grad_norm})

        return train_step

    def step_key(self, shape: MeshShape, devices: Devices = None) -> tuple:
        devs = jax.devices() if devices is None else devices
        spec = tuple((x.shape, str(x.dtype)) for x in jax.tree.leaves(self.batch_spec))
        # The graphdef (the forward) and the optimizer object itself, not its id(): equal
        # parameter shapes or a recycled id can never select another program.
        return ("train_step", shape, device_ids(devs[: shape.num_devices]), self.fingerprint,
                self.fmodel.graphdef, self.optimizer, spec, self.state_sharding, self.remat,
                str(self.compute_dtype), self.rng_seed, self.donate, self.skip_nonfinite)

    def lower_step(self, shape: MeshShape, devices: Devices = None) -> jax.stages.Lowered:
        state_sh = self.shardings(shape, devices)
        batch_sh = self.batch_sharding(shape, devices)
        replicated = NamedSharding(self.mesh(shape, devices), P())
        step = jax.jit(self._train_step(shape, devices),
                       in_shardings=(state_sh, batch_sh),
                       out_shardings=(state_sh, replicated),
                       donate_argnums=(0,) if self.donate else ())
        return step.lower(self.abstract_state(shape), self.batch_spec)

    def compile_step(self, shape: MeshShape, devices: Devices = None, *,
                     origin: str = "on-demand") -> jax.stages.Compiled:
        """The AOT-compiled ``(state, batch) -> (state, {"loss", "grad_norm"})`` for
        `shape` (cached)."""
        self.check(shape, devices)
        return self.cache.get(self.step_key(shape, devices),
                              lambda: self.lower_step(shape, devices).compile(), origin=origin)
