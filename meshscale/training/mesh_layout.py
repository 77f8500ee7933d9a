"""`MeshLayout`: everything about the train state on one mesh, computed once.

The compiled step, placement, checkpoint restore targets, try-runs and memory estimates
all read the same object (`Trainer.layout(shape, devices)`, cached), so how a state is
stored and split on a mesh is decided in one place (`meshscale.layout.sharding`) and
computed once per mesh, never re-derived by a reader.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from meshscale.layout.mesh import MeshShape


@dataclasses.dataclass(frozen=True, eq=False)
class MeshLayout:
    """The train state on one mesh.

    Attributes:
      shape: the mesh shape.
      mesh: the `jax.sharding.Mesh` over the devices it was built for.
      abstract: the state's shapes and dtypes as stored on this mesh (the layer stack
        padded to the schedule's rows, `meshscale.layout.padding`), a `TrainState` of
        `jax.ShapeDtypeStruct`s without shardings.
      specs: the `PartitionSpec` of every state leaf (`meshscale.layout.sharding`).
      shardings: `specs` as `NamedSharding`s on `mesh`.
      targets: `abstract` with `shardings`: where a placed or restored state goes.
      rows: the `NamedSharding` of a batch leaf's rows (split over ``data``).
    """

    shape: MeshShape
    mesh: jax.sharding.Mesh
    abstract: Any
    specs: Any
    shardings: Any
    targets: Any
    rows: NamedSharding

    @classmethod
    def build(cls, shape: MeshShape, mesh: jax.sharding.Mesh, abstract: Any, specs: Any,
              rows_spec: P) -> MeshLayout:
        is_spec = lambda x: isinstance(x, P)
        shardings = jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs, is_leaf=is_spec)
        targets = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                               abstract, shardings)
        return cls(shape, mesh, abstract, specs, shardings, targets,
                   NamedSharding(mesh, rows_spec))

    def batch_shardings(self, batch_spec: Any) -> Any:
        """The sharding of every leaf of a batch shaped like `batch_spec`."""
        return jax.tree.map(lambda _: self.rows, batch_spec)
