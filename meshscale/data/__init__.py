"""Input pipelines that survive a resize: global batches keyed by step, on grain.

`Batches` maps step ``i`` to the same global batch on every mesh and process count (the
step in a checkpoint is the data position), reads only the rows this process's devices
train on, and prefetches the next steps in background threads. `pack_documents` packs
variable-length documents into rows with segment ids (grain transforms).

Imports: `training` types only (never the elastic loop; `elastic/` and `app/` import it).
`source` holds the protocol the loop checks and imports no grain.
"""

from meshscale.data.source import BatchSource

__all__ = ["BatchSource", "Batches", "PackDocuments", "pack_documents"]
_GRAIN = {"Batches": "batches", "PackDocuments": "packing", "pack_documents": "packing"}


def __getattr__(name: str):
    """grain is imported on first use of a name that needs it, not by `import meshscale`
    (the loop imports `meshscale.data.source`)."""
    if name in _GRAIN:
        import importlib

        return getattr(importlib.import_module(f"meshscale.data.{_GRAIN[name]}"), name)
    raise AttributeError(f"module 'meshscale.data' has no attribute {name!r}")
