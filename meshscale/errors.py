"""One exception class per kind of user mistake; each message says what to change.

All derive from `MeshscaleError` (a `ValueError`), so a caller can catch them together.
"""


class MeshscaleError(ValueError):
    """Base class of every error meshscale raises for bad input."""


class InsufficientDevices(MeshscaleError):
    """Fewer devices than the request needs (a mesh shape, or `p_min`)."""


class InvalidArgument(MeshscaleError):
    """An argument of the wrong type or out of range (a bad flag, an unknown option value)."""


class InvalidMeshShape(InvalidArgument):
    """A mesh shape that cannot run this model and batch (layers, batch, microbatches)."""


class ContractError(MeshscaleError):
    """A model that does not follow the reshardable-model contract (`meshscale.model.contract`)."""


class IncompatibleCheckpoint(MeshscaleError):
    """A checkpoint written for another model, optimizer or format."""


class ResourceError(MeshscaleError):
    """A resource source that cannot say how many devices are available."""


class StorageNotShared(MeshscaleError):
    """A checkpoint directory that some process of a multi-process job cannot see."""


class RunDirectoryLocked(MeshscaleError):
    """A run directory another live job writes to (one writer per run directory)."""


class RunDirRefused(MeshscaleError):
    """A ``--run-dir`` a command cannot use as asked; the message says what to pass."""


class InvalidBatch(MeshscaleError):
    """A batch whose structure, shapes or dtypes differ from the one the step compiled for."""


class NonFiniteStep(RuntimeError):
    """A step whose loss or gradient norm was not finite, under ``on_nonfinite="stop"``.

    Attributes: ``step`` (the first non-finite step) and ``checkpoint_step`` (the newest
    kept checkpoint, all of whose values are finite; None when there is none).
    """

    def __init__(self, message: str, *, step: int, checkpoint_step: int | None):
        super().__init__(message)
        self.step, self.checkpoint_step = step, checkpoint_step


class CheckpointWriteError(RuntimeError):
    """A checkpoint write that failed (in the background or at exit): the step is not on
    disk. Raised from the next `ElasticTrainer.step` after the failure."""


class Interrupted(SystemExit):
    """The job stopped on SIGTERM or SIGINT after saving its step (a `SystemExit`, so an
    uncaught one ends the process without a traceback, with status 128 + signal number).

    Attributes: ``step`` (saved), ``signal_name``, ``directory`` (the checkpoint dir).
    """

    def __init__(self, message: str, *, step: int, signal_number: int, directory: str):
        super().__init__(128 + signal_number)
        self.message, self.step, self.directory = message, step, directory
        self.signal_number = signal_number

    @property
    def signal_name(self) -> str:
        import signal

        return signal.Signals(self.signal_number).name

    def __str__(self) -> str:
        return self.message
