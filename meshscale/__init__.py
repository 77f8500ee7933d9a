"""meshscale: re-parallelize a running JAX training job when its accelerators change.

The public surface is re-exported here; implementation lives in one module per concept
(see the module map in the README).
"""

from meshscale import distributed, resources
from meshscale.checkpoint import Checkpointer
from meshscale.compile_cache import CompileCache, enable_persistent_cache
from meshscale.elastic import ElasticTrainer
from meshscale.errors import (
    ContractError,
    IncompatibleCheckpoint,
    InsufficientDevices,
    InvalidMeshShape,
    MeshscaleError,
    ResourceError,
    StorageNotShared,
)
from meshscale.mesh import MeshShape, make_mesh
from meshscale.model import LayerStack, ReshardableModel, run_layers, stack_layers
from meshscale.search import Baseline, Decision, search
from meshscale.space import Candidate, candidates
from meshscale.train import Trainer, TrainState
from meshscale.tryrun import TryRunResult, try_run

__version__ = "0.1.0"

__all__ = [
    "Checkpointer",
    "CompileCache",
    "ContractError",
    "ElasticTrainer",
    "IncompatibleCheckpoint",
    "InsufficientDevices",
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
    "Decision",
    "TryRunResult",
    "candidates",
    "search",
    "try_run",
]
