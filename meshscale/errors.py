"""One exception class per kind of user mistake; each message says what to change.

All derive from `MeshscaleError` (a `ValueError`), so a caller can catch them together.
"""


class MeshscaleError(ValueError):
    """Base class of every error meshscale raises for bad input."""


class InsufficientDevices(MeshscaleError):
    """Fewer devices than the request needs (a mesh shape, or `p_min`)."""


class InvalidMeshShape(MeshscaleError):
    """A mesh shape that cannot run this model and batch (layers, batch, microbatches)."""


class ContractError(MeshscaleError):
    """A model that does not follow the reshardable-model contract (`meshscale.model`)."""


class IncompatibleCheckpoint(MeshscaleError):
    """A checkpoint written for another model, optimizer or format."""


class ResourceError(MeshscaleError):
    """A resource source that cannot say how many devices are available."""


class StorageNotShared(MeshscaleError):
    """A checkpoint directory that some process of a multi-process job cannot see."""
