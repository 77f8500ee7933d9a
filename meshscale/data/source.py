"""What the elastic loop asks of a data source: global batch rows keyed by step.

Kept free of grain (the loop imports this module on every `import meshscale`). A source
is a pure function of the step: `rows(step, rows)` is the same on every mesh and process
count, so the step in a checkpoint is the data position and a resume is exact.

Never: depend on how many processes read, or on what was read before.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

Batch = Any  # a pytree of arrays with a leading global-batch axis


@runtime_checkable
class BatchSource(Protocol):
    """Global batches by step; `meshscale.data.Batches` is the grain-backed one."""

    global_batch: int

    def rows(self, step: int, rows: slice) -> Batch:
        """Rows `rows` of global batch `step` (host arrays)."""

    def batch(self, step: int) -> Batch:
        """The whole global batch `step`."""

    def spec(self) -> Batch:
        """The global batch's `jax.ShapeDtypeStruct`s (one example read)."""

    def check(self, spec: Batch) -> None:
        """Raise `InvalidBatch` (one line) unless the examples fit `spec`."""
