"""meshscale: re-parallelize a running JAX training job when its accelerators change.

The public surface is re-exported here; implementation lives in one module per concept
(see the module map in the README).
"""

from meshscale import _logging  # noqa: F401 (first: orbax must not configure logging)
from meshscale.elastic import resources
from meshscale.elastic.options import CheckpointPolicy, MetricsPolicy, SwitchPolicy
from meshscale.elastic.trainer import ElasticTrainer
from meshscale.errors import (
    ContractError,
    IncompatibleCheckpoint,
    InsufficientDevices,
    InvalidArgument,
    InvalidMeshShape,
    MeshscaleError,
    ResourceError,
    StorageNotShared,
)
from meshscale.layout.mesh import MeshShape, make_mesh
from meshscale.model.contract import LayerStack, ReshardableModel, run_layers, stack_layers
from meshscale.observe.goodput import Ledger
from meshscale.observe.writers import MetricWriter, TensorBoardWriter
from meshscale.planning.search import Baseline, Decision, search
from meshscale.planning.space import Candidate, SearchSpace, candidates
from meshscale.planning.tryrun import TryRunResult, try_run
from meshscale.runtime import distributed
from meshscale.store.checkpoint import Checkpointer
from meshscale.training.compile_cache import CompileCache, enable_persistent_cache
from meshscale.training.timing import Timing
from meshscale.training.trainer import Trainer, TrainState

__version__ = "0.1.0"

__all__ = [
    "CheckpointPolicy",
    "Checkpointer",
    "Ledger",
    "MetricWriter",
    "MetricsPolicy",
    "SwitchPolicy",
    "TensorBoardWriter",
    "CompileCache",
    "ContractError",
    "ElasticTrainer",
    "IncompatibleCheckpoint",
    "InsufficientDevices",
    "InvalidArgument",
    "InvalidMeshShape",
    "LayerStack",
    "MeshShape",
    "MeshscaleError",
    "ReshardableModel",
    "ResourceError",
    "StorageNotShared",
    "TrainState",
    "Trainer",
    "enable_persistent_cache",
    "make_mesh",
    "distributed",
    "resources",
    "run_layers",
    "stack_layers",
    "Baseline",
    "Candidate",
    "SearchSpace",
    "Timing",
    "Decision",
    "TryRunResult",
    "candidates",
    "search",
    "try_run",
]
