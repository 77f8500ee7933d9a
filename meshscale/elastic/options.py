"""The elastic loop's own settings, as small frozen dataclasses with documented fields.

What the model trains with (precision, dropout keys, donation, state sharding, remat) is
the `Trainer`'s; which meshes may be tried is the `SearchSpace`; how steps are timed is
the `Timing`. What is left to the elastic loop is when to save (`CheckpointPolicy`), when
to move (`SwitchPolicy`) and where its metrics go (`MetricsPolicy`). Each is checked when
built, so a bad value fails where it is written.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Sequence
from typing import Literal

from meshscale.errors import InvalidArgument
from meshscale.planning.precompile import resolve_mode

NONFINITE_POLICIES = ("stop", "skip_step", "rewind")
# Saves every 100 steps cost ~1% of step time (benchmarks/elastic_step.py: every 10 steps
# measured <= 1.10x the bare step, the blocking copy off the devices being the cost).
DEFAULT_CHECKPOINT_EVERY = 100


def _positive(owner: str, name: str, value, *, none_ok: bool = False) -> None:
    if value is None and none_ok:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        what = "a positive int or None" if none_ok else "a positive int"
        raise InvalidArgument(f"{owner}.{name} must be {what}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class CheckpointPolicy:
    """What reaches disk, and when (DESIGN.md, "Never lose work").

    Attributes:
      every: save every this many steps (to resume after a crash), and the last step at
        `close()`; None: no checkpoints but those a switch needs.
      max_to_keep: newest checkpoints kept (the newest finite one is never rotated out).
      on_nonfinite: a step whose loss or gradient norm is nan or inf: ``"stop"`` (raise
        `NonFiniteStep`; nothing after the last finite step is saved), ``"skip_step"``
        (the step leaves the state unchanged, decided on the device: needs
        ``Trainer(skip_nonfinite=True)``) or ``"rewind"`` (restore the newest
        checkpoint, always finite, and go on with the next batches).
      handle_signals: on SIGTERM / SIGINT save at the next step boundary and raise
        `Interrupted`.
      persistent_cache: keep JAX's compilation cache in ``checkpoint_dir/jax_cache``, so a
        restarted job loads its steps instead of compiling them.
    """

    every: int | None = DEFAULT_CHECKPOINT_EVERY
    max_to_keep: int = 3
    on_nonfinite: Literal["stop", "skip_step", "rewind"] = "stop"
    handle_signals: bool = True
    persistent_cache: bool = True

    def __post_init__(self):
        _positive("CheckpointPolicy", "every", self.every, none_ok=True)
        _positive("CheckpointPolicy", "max_to_keep", self.max_to_keep)
        if self.on_nonfinite not in NONFINITE_POLICIES:
            raise InvalidArgument(f"on_nonfinite must be one of {NONFINITE_POLICIES}, got "
                                  f"{self.on_nonfinite!r}")


@dataclasses.dataclass(frozen=True)
class SwitchPolicy:
    """When the loop looks for a better mesh and when it moves.

    Attributes:
      threshold: switch only if the best try-run beats the baseline by more than this.
      eps: the maximum useful device count is the smallest whose throughput is within
        `eps` of the best measured.
      check_every: poll the resource source every this many steps.
      total_steps: when given, a switch must also pay back its measured cost over the
        steps left.
      via: ``"checkpoint"`` (restore with the new shardings; works across hosts) or
        ``"memory"`` (`Trainer.place`; one process only). The checkpoint is written
        first either way.
      precompile: ``"auto"`` (on for GPU/TPU, off on CPU), ``"on"``, ``"off"``, or the
        device counts to prepare for: compile the likely next meshes in the background.
      precompile_budget: most background compiles per plan.
      measure: replaces the try-runs (``Candidate -> TryRunResult``): measurements
        injected by tests, or an external cost model. None: real try-runs.
    """

    threshold: float = 0.05
    eps: float = 0.05
    check_every: int = 50
    total_steps: int | None = None
    via: Literal["checkpoint", "memory"] = "checkpoint"
    precompile: str | Sequence[int] = "auto"
    precompile_budget: int = 8
    measure: Callable | None = None

    def __post_init__(self):
        if self.via not in ("checkpoint", "memory"):
            raise InvalidArgument(f"switch_via must be 'checkpoint' or 'memory', got "
                                  f"{self.via!r}")
        _positive("SwitchPolicy", "check_every", self.check_every)
        _positive("SwitchPolicy", "total_steps", self.total_steps, none_ok=True)
        _positive("SwitchPolicy", "precompile_budget", self.precompile_budget)
        for name in ("threshold", "eps"):
            if not isinstance(getattr(self, name), int | float) or getattr(self, name) < 0:
                raise InvalidArgument(f"SwitchPolicy.{name} must be a number >= 0, got "
                                      f"{getattr(self, name)!r}")
        if not isinstance(self.precompile, str):
            object.__setattr__(self, "precompile", tuple(self.precompile))
        resolve_mode(self.precompile)  # refuses an unknown mode here, not at the first step


@dataclasses.dataclass(frozen=True)
class MetricsPolicy:
    """Where the loop's metrics go: per timing window the losses of its steps,
    samples/s, mesh, device count and goodput, and every event. Process 0 writes them in
    a background thread; the loop never waits for a write.

    Attributes:
      directory: where ``metrics.jsonl`` and the TensorBoard files go (a local path);
        None: the checkpoint directory.
      jsonl: write ``metrics.jsonl`` (the run's own record: the report reads it and a
        restarted job finds there which steps it trains again). Off only to measure what
        writing costs.
      tensorboard: write TensorBoard event files to ``directory/tensorboard``; None: when
        ``tensorboardX`` is installed (``meshscale[tensorboard]``), True: refuse to start
        without it.
      writers: more `meshscale.observe.writers.MetricWriter` s (a ``clu.metric_writers``
        writer as is, W&B in a few lines).
    """

    directory: str | None = None
    jsonl: bool = True
    tensorboard: bool | None = None
    writers: Sequence = ()

    def __post_init__(self):
        from meshscale.observe.writers import MetricWriter

        object.__setattr__(self, "writers", tuple(self.writers))
        for writer in self.writers:
            if not isinstance(writer, MetricWriter):
                raise InvalidArgument(f"MetricsPolicy.writers: {writer!r} is not a "
                                      "MetricWriter (write_scalars, write_texts, flush, close)")
        if self.tensorboard not in (None, True, False):
            raise InvalidArgument(f"MetricsPolicy.tensorboard must be None, True or False, "
                                  f"got {self.tensorboard!r}")
        from meshscale.observe.writers import tensorboard_available

        if self.tensorboard and not tensorboard_available():  # here, before any lock
            raise InvalidArgument("MetricsPolicy(tensorboard=True) needs tensorboardX: pip "
                                  "install 'meshscale[tensorboard]'")
        if self.directory is not None and "://" in str(self.directory):
            raise InvalidArgument(f"MetricsPolicy.directory must be a local path, got "
                                  f"{self.directory!r}: the JSONL record is appended line "
                                  "by line")


# -- the keyword form of meshscale 0.1 (deprecated) -----------------------------------
_TRAINER_KEYS = ("global_batch", "example_batch", "remat", "state_sharding", "compile_cache")
_CHECKPOINT_KEYS = {"checkpoint_every": "every", "max_to_keep": "max_to_keep",
                    "on_nonfinite": "on_nonfinite", "handle_signals": "handle_signals",
                    "persistent_cache": "persistent_cache"}
_SWITCH_KEYS = {"threshold": "threshold", "check_every": "check_every",
                "total_steps": "total_steps", "switch_via": "via", "precompile": "precompile",
                "precompile_budget": "precompile_budget"}
_TIMING_KEYS = {"timing_window": "window", "baseline_window": "baseline_steps",
                "history_limit": "history_limit"}


def from_keywords(model, optimizer, kwargs: dict) -> dict:
    """The arguments of the new constructor built from the old keyword form
    (``ElasticTrainer(model, optimizer, global_batch=..., p_min=..., ...)``), with a
    `DeprecationWarning`."""
    from meshscale.planning.space import SearchSpace
    from meshscale.training.timing import Timing
    from meshscale.training.trainer import Trainer

    kwargs = dict(kwargs)
    known = {*_TRAINER_KEYS, *_CHECKPOINT_KEYS, *_SWITCH_KEYS, *_TIMING_KEYS, "p_min",
             "search_options", "checkpoint_dir", "resources", "on_event"}
    if unknown := sorted(set(kwargs) - known):
        raise TypeError(f"ElasticTrainer() got unexpected keyword argument(s) {unknown}")
    warnings.warn("ElasticTrainer(model, optimizer, global_batch=..., ...) is deprecated: pass "
                  "a Trainer and the option objects, ElasticTrainer(Trainer(model, optimizer, "
                  "global_batch=...), checkpoint_dir=..., resources=..., "
                  "space=SearchSpace(p_min=...))", DeprecationWarning, stacklevel=4)
    pick = lambda names: {new: kwargs.pop(old) for old, new in names.items() if old in kwargs}
    checkpoints = CheckpointPolicy(**pick(_CHECKPOINT_KEYS))
    search = dict(kwargs.pop("search_options", None) or {})
    switching = SwitchPolicy(**pick(_SWITCH_KEYS),
                             **{k: search.pop(k) for k in ("eps", "measure") if k in search})
    timing = Timing(**pick(_TIMING_KEYS),
                    **{k: search.pop(k) for k in ("warmup", "steps") if k in search})
    if "p_min" not in kwargs:
        raise TypeError("ElasticTrainer() missing required keyword argument 'p_min'")
    space = SearchSpace(p_min=kwargs.pop("p_min"), **search)
    trainer_kw = {k: kwargs.pop(k) for k in _TRAINER_KEYS if k in kwargs}
    trainer_kw["cache"] = trainer_kw.pop("compile_cache", None)
    trainer = Trainer(model, optimizer, skip_nonfinite=checkpoints.on_nonfinite == "skip_step",
                      **trainer_kw)
    return dict(trainer=trainer, space=space, timing=timing, switching=switching,
                checkpoints=checkpoints, **kwargs)
