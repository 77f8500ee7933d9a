"""What a checkpoint step is on disk, apart from the Orbax machinery that writes it.

`meshscale.store.checkpoint` decides when to save, what to keep and which step to
restore; this module is the format both sides of that agree on: the item names, the JSON
metadata written beside each step (and the checks that refuse another model's step or a
damaged one), how the arrays are written, and the abstract targets a step is read into.

On-disk layout (Orbax `CheckpointManager`, atomic by temporary directory + rename)::

    DIR/<step>/state/      Orbax pytree of {"step", "params", "opt_state"} (plain dicts)
    DIR/<step>/meshscale/  JSON: format, model fingerprint, mesh shape, global batch, ...

The layer stack is stored layer-major, row ``i`` = layer ``i``, as the mesh that saved it
holds it: padded with zero rows past ``num_layers`` up to the mesh's `Schedule.rows`
(recorded as ``block_rows`` in the metadata). A restore cuts or adds zero rows for the
target mesh (Orbax ``strict=False``), so any split restores from any other, and from
checkpoints of unpadded stacks.

The state item needs no meshscale to read: optimizer NamedTuples and tuples are stored
as dicts keyed by field name / index, e.g. ``opt_state["0"]["mu"]``. With plain Orbax::

    ckptr = ocp.StandardCheckpointer()
    tree = ckptr.metadata(f"{DIR}/{step}/state").item_metadata.tree
    state = ckptr.restore(f"{DIR}/{step}/state", jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=some_sharding), tree))
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from meshscale.errors import IncompatibleCheckpoint
from meshscale.layout.mesh import DATA, PIPE, MeshShape
from meshscale.layout.sharding import is_block_leaf
from meshscale.training.trainer import Devices, Trainer, TrainState

FORMAT = "meshscale.train_state.v1"
STATE_ITEM = "state"
META_ITEM = "meshscale"
# Orbax writes this file into a step directory just before it commits the step.
COMMIT_MARKER = "commit_success.txt"
META_FILE = "metadata"  # the file `ocp.JsonCheckpointHandler` writes in its item directory


# -- the metadata beside each step ------------------------------------------------------
def step_metadata(trainer: Trainer, state: TrainState, *, shape: MeshShape | None,
                  step: int, opt_fingerprint: str, digests: dict | None) -> dict:
    """The JSON metadata saved beside `state` as step `step`."""
    meta = {
        "format": FORMAT,
        "meshscale_version": _version(),
        "model_fingerprint": trainer.fingerprint,
        "opt_state_fingerprint": opt_fingerprint,
        "mesh_shape": str(shape) if shape is not None else _mesh_text(state),
        "global_batch": trainer.global_batch,
        "num_layers": trainer.num_layers,
        "param_count": int(sum(np.size(x) for x in
                               jax.tree.leaves(trainer.abstract_state().params))),
        "block_rows": _block_rows(state, trainer.num_layers),
        "step": step,
    }
    if digests is not None:
        meta["digests"] = digests
    return meta


def _block_rows(state: TrainState, num_layers: int) -> int:
    """The saved layer stack's length: `num_layers` plus the mesh's zero padding rows."""
    rows = [x.shape[0] for path, x in jax.tree_util.tree_flatten_with_path(state.params)[0]
            if is_block_leaf(path, x.shape, num_layers)]
    return max(rows, default=num_layers)


def _mesh_text(state: TrainState) -> str:
    sharding = getattr(jax.tree.leaves(state.params)[0], "sharding", None)
    if isinstance(sharding, NamedSharding) and {PIPE, DATA} <= set(sharding.mesh.shape):
        return f"{sharding.mesh.shape[PIPE]}x{sharding.mesh.shape[DATA]}"
    return "unknown"


def _version() -> str:
    from meshscale import __version__  # late: meshscale/__init__ imports this module

    return __version__


def read_metadata(directory: os.PathLike, step: int) -> dict:
    """This process's read of the JSON metadata of `step`, straight from its file:
    `CheckpointManager.restore` synchronises the processes, and a local check must
    not enter a collective before the processes agreed to."""
    return dict(json.loads((directory / str(step) / META_ITEM / META_FILE).read_text()))


# -- damage and compatibility -----------------------------------------------------------
def committed(directory: os.PathLike, step: int) -> bool:
    """Whether Orbax committed step `step` (its marker is there)."""
    return (directory / str(step) / COMMIT_MARKER).exists()


def readable_metadata(directory: os.PathLike, step: int, trainer: Trainer,
                      opt_fingerprint: str) -> dict:
    """The metadata of a committed step that fits `trainer`; raises `FileNotFoundError`
    (never committed), another error (damaged metadata) or `IncompatibleCheckpoint`."""
    if not committed(directory, step):
        raise FileNotFoundError(f"step {step} has no {COMMIT_MARKER} (never committed)")
    meta = read_metadata(directory, step)
    check_compatible(meta, trainer, opt_fingerprint, directory)
    return meta


def check_compatible(meta: dict, trainer: Trainer, opt_fingerprint: str,
                     directory: os.PathLike) -> None:
    """Raise `IncompatibleCheckpoint`, naming the fix, unless `meta` fits the trainer."""
    where = f"checkpoint in {directory}"
    if meta.get("format") != FORMAT:
        raise IncompatibleCheckpoint(
            f"{where} has format {meta.get('format')!r}, this meshscale reads {FORMAT!r}: "
            "point checkpoint_dir elsewhere or use the meshscale version that wrote it")
    if meta["model_fingerprint"] != trainer.fingerprint:
        raise IncompatibleCheckpoint(
            f"{where} was written for model {meta['model_fingerprint']}, this trainer's is "
            f"{trainer.fingerprint}: point checkpoint_dir elsewhere or load the "
            "matching model")
    if meta["opt_state_fingerprint"] != opt_fingerprint:
        raise IncompatibleCheckpoint(
            f"{where} was written for optimizer state {meta['opt_state_fingerprint']}, "
            f"this trainer's is {opt_fingerprint}: point checkpoint_dir elsewhere or "
            "use the optimizer that wrote it")
    if meta["global_batch"] != trainer.global_batch:
        raise IncompatibleCheckpoint(
            f"{where} was written for global batch {meta['global_batch']}, this trainer's "
            f"is {trainer.global_batch}: use global_batch={meta['global_batch']} or "
            "point checkpoint_dir elsewhere")


# -- the arrays: how they are written, what they are read into ---------------------------
def state_handler() -> ocp.PyTreeCheckpointHandler:
    """Orbax's standard pytree handler, minus replica-parallel writes on one process.

    Replica-parallel saving slices every replicated array per replica with a freshly
    compiled `lax.slice` per shape, inside the blocking part of an async save: measured
    on 8 CPU devices, 3-5 s for a first save on a mesh instead of 0.2 s. It only pays off
    when the replicas sit on different hosts that write in parallel. Compression is off:
    trained float weights and Adam moments barely compress (7% on random normals) and
    zstd made save + restore about 1.5x slower. Plain Orbax reads the files as it reads
    `StandardSave`'s.
    """
    default = ocp.type_handlers.get_type_handler(jax.Array)
    arrays = ocp.type_handlers.ArrayHandler(
        use_replica_parallel=jax.process_count() > 1,
        array_metadata_store=getattr(default, "_array_metadata_store", None))
    return ocp.PyTreeCheckpointHandler(
        use_compression=False, type_handler_registry=ocp.type_handlers.create_type_handler_registry(
            (jax.Array, arrays)))


def saved_shape(meta: dict, trainer: Trainer) -> MeshShape | None:
    """The mesh a step was saved from, as its metadata records it, or None where it does
    not: steps written before ``block_rows`` was recorded (their stack may be stored
    unpadded whatever the mesh), and a mesh read off the state at save time ("2x4", no
    schedule) whose GPipe padding is not the one stored (it was circular)."""
    try:
        shape = MeshShape.parse(meta["mesh_shape"])
        rows = trainer.rows(shape)
    except (KeyError, TypeError, ValueError):  # "unknown", or not a mesh of this model
        return None
    return shape if meta.get("block_rows") == rows else None


def restore_targets(trainer: Trainer, target: MeshShape | TrainState, devices: Devices,
                    saved: MeshShape | None = None) -> TrainState:
    """`ShapeDtypeStruct`s with shardings to read a step saved from mesh `saved` into.

    A `MeshShape` target is read into its own stored shapes (`Trainer.targets`). A
    `TrainState` of shardings does not say which schedule its mesh runs, so the stack's
    padding is decided here, once: onto the mesh the step was saved from (the same pipe
    and data sizes as `saved`, from `saved_shape`) the state comes back as stored, its
    schedule's padding included (circular or not). Onto another mesh, or from a step
    that does not record its mesh (`saved` None, older steps: the behaviour they always
    had), the stack is padded for a GPipe schedule on the target's mesh; pass a
    `MeshShape` to restore onto a circular one.
    """
    if isinstance(target, MeshShape):
        return trainer.targets(target, devices)
    shardings = target_shardings(target)
    meshes = {(s.mesh.shape.get(PIPE, 1), s.mesh.shape.get(DATA, 1))
               for s in jax.tree.leaves(shardings)}
    abstract = trainer.abstract_state()
    if len(meshes) == 1:
        mesh = MeshShape(*meshes.pop())  # GPipe: another mesh, or an older step
        if saved is not None and (saved.pipe, saved.data) == (mesh.pipe, mesh.data):
            mesh = saved
        abstract = trainer.abstract_state(mesh)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, shardings)


def target_shardings(target: TrainState) -> TrainState:
    """`target`'s shardings, all `NamedSharding`s; `TypeError` for anything else."""
    if not isinstance(target, TrainState):
        raise TypeError(f"restore target must be a MeshShape or a TrainState of "
                        f"NamedShardings, got {type(target).__name__}")
    named = [s for s in jax.tree.leaves(target) if isinstance(s, NamedSharding)]
    if not named:
        raise TypeError("restore target TrainState holds no NamedSharding")
    # Orbax needs a NamedSharding on every leaf; replicate the odd one (e.g. the step
    # counter placed on a single device) over the mesh of the others.
    replicated = NamedSharding(named[0].mesh, P())
    return jax.tree.map(lambda s: s if isinstance(s, NamedSharding) else replicated, target)


def restore_args(tree: dict) -> dict:
    """Orbax's restore arguments for `tree`; zero padding (`meshscale.layout.padding`) is cut
    or added (``strict=False``) to the target mesh's shapes, so a state saved on any
    mesh, or unpadded, restores onto any other (the metadata check has already
    refused another model's checkpoint)."""
    args = ocp.checkpoint_utils.construct_restore_args(tree)

    def relax(arg, leaf):
        if not leaf.shape:
            return arg
        return ocp.ArrayRestoreArgs(sharding=leaf.sharding, global_shape=leaf.shape,
                                    dtype=leaf.dtype, strict=False)

    return jax.tree.map(relax, args, tree)
