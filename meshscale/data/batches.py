"""`Batches`: global batch ``i`` is a pure function of ``i``, on any mesh and process count.

Over a random-access grain `MapDataset` (or a `grain.sources` random-access source such as
`ArrayRecordDataSource`), shuffled with grain's seeded per-epoch shuffle and repeated
without end: row ``r`` of global batch ``step`` is example ``step * global_batch + r`` of
that endless sequence. Epochs, shuffling and transforms (tokenise, pack, pad) are grain's;
meshscale adds only this step -> sample mapping and the prefetch of the next steps' rows
in background threads. A process asks for the rows its devices train on
(`Trainer.local_rows`), so it reads only those; when the mesh changes, the queued reads
for the old rows are dropped and the new rows queued (re-targeted).

Resume is exact by construction: the step in the checkpoint is the data position, and
nothing else (no iterator state) is needed. Sources that are not random access (a grain
`IterDataset`, a generator) are refused: their position would need iterator state.

Never: let the batch of a step depend on the mesh, the process count, the order of calls
or what was prefetched.
"""

from __future__ import annotations

import collections.abc
import concurrent.futures
import threading
import time
from typing import Any

import grain
import jax
import numpy as np

from meshscale.data.source import Batch
from meshscale.errors import InvalidArgument, InvalidBatch


class Batches:
    """Global batches keyed by step over a random-access grain dataset.

    Args:
      dataset: a `grain.MapDataset` (transforms applied: map, random_map, packing) or a
        random-access source (`__len__` and `__getitem__`, e.g.
        `grain.sources.ArrayRecordDataSource`). Each example is a pytree of arrays
        (e.g. ``{"tokens": int32[seq_len + 1]}``); a batch stacks them.
      global_batch: examples per step (the `Trainer`'s).
      seed: grain's shuffle seed (a new order each epoch, the same on every machine).
      shuffle: shuffle the examples (grain's `MapDataset.shuffle`); else in order.
      prefetch: how many next steps to read ahead in background threads (0: none). The
        elastic loop dispatches steps without waiting for the device, up to a timing
        window (`Timing.window`, 10) ahead, so the default covers one window
        (benchmarks/data.py: prefetch 2 waits 3-8% of the step time, 10 waits 0%).
      threads: reader threads (default: `prefetch`, at most 4).
    """

    def __init__(self, dataset: Any, global_batch: int, *, seed: int = 0,
                 shuffle: bool = True, prefetch: int = 10, threads: int | None = None):
        if not isinstance(global_batch, int) or global_batch < 1:
            raise InvalidArgument(f"global_batch must be a positive int, got {global_batch!r}")
        if not isinstance(prefetch, int) or prefetch < 0:
            raise InvalidArgument(f"prefetch must be an int >= 0, got {prefetch!r}")
        base = _map_dataset(dataset)
        self.num_examples = len(base)
        if self.num_examples < global_batch:
            raise InvalidArgument(
                f"the dataset has {self.num_examples} examples, fewer than one global batch "
                f"of {global_batch}: add data or lower global_batch")
        self.global_batch, self.seed, self.shuffle = global_batch, seed, shuffle
        self.dataset = (base.shuffle(seed=seed) if shuffle else base).repeat()
        self.prefetch = prefetch
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max(1, threads or min(prefetch, 4)), thread_name_prefix="meshscale-data")
        self._ahead: dict[tuple[int, int, int], concurrent.futures.Future] = {}
        self._lock = threading.Lock()
        self._first: Any = None
        self.examples_read = 0  # examples this process read (prefetched ones included)
        self.bytes_read = 0  # their bytes, as arrays after the dataset's transforms
        self.wait_seconds = 0.0  # time `rows` waited for a read (0 when prefetch kept up)

    # -- the mapping ------------------------------------------------------------------
    def indices(self, step: int) -> range:
        """Positions of global batch `step`'s rows in the shuffled, repeated dataset."""
        return range(step * self.global_batch, (step + 1) * self.global_batch)

    def epoch(self, step: int) -> int:
        """The epoch global batch `step` starts in."""
        return step * self.global_batch // self.num_examples

    def batch(self, step: int) -> Batch:
        """The whole global batch `step` (every row: what one process alone trains on)."""
        return self.rows(step, slice(0, self.global_batch))

    def rows(self, step: int, rows: slice = slice(None)) -> Batch:
        """Rows `rows` of global batch `step` (host arrays), then queue the next
        `prefetch` steps' same rows in the background."""
        start, stop, _ = rows.indices(self.global_batch)
        key = (int(step), start, max(start, stop))
        with self._lock:
            future = self._ahead.pop(key, None)
            self._retarget(key)
        tick = time.perf_counter()
        out = self._read(*key) if future is None or future.cancelled() else future.result()
        self.wait_seconds += time.perf_counter() - tick
        return out

    def placed(self, step: int, trainer: Any, shape: Any, devices: Any = None) -> Batch:
        """Global batch `step` on `trainer`'s `shape` mesh, this process reading only its
        rows (`Trainer.local_rows`): for loops over a plain `Trainer`."""
        return trainer.put_batch(self.rows(step, trainer.local_rows(shape, devices)),
                                 shape, devices)

    # -- structure --------------------------------------------------------------------
    def spec(self) -> Batch:
        """The global batch's `jax.ShapeDtypeStruct`s, from the first example."""
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(
            (self.global_batch, *np.shape(x)), np.asarray(x).dtype), self._example())

    def check(self, spec: Batch) -> None:
        """Raise `InvalidBatch` (one line) unless the examples have `spec`'s structure,
        trailing shapes and dtypes (the step the trainer compiled)."""
        mine = self.spec()
        if jax.tree.structure(mine) != jax.tree.structure(spec):
            raise InvalidBatch(
                f"the dataset's examples are {_keys(mine)}, the model's batch needs "
                f"{_keys(spec)}: map the dataset (grain MapDataset.map) to those keys, or "
                "build the Trainer with example_batch=batches.spec()")
        for (path, got), want in zip(jax.tree_util.tree_flatten_with_path(mine)[0],
                                     jax.tree.leaves(spec), strict=True):
            if got.shape[1:] != want.shape[1:] or got.dtype != want.dtype:
                raise InvalidBatch(
                    f"example leaf {jax.tree_util.keystr(path)} is {got.dtype.name}"
                    f"{list(got.shape[1:])}, the model needs {want.dtype.name}"
                    f"{list(want.shape[1:])}: transform the dataset to that shape and dtype")

    # -- reading ----------------------------------------------------------------------
    def _example(self) -> Any:
        if self._first is None:
            self._first = self.dataset[0]
        return self._first

    def _read(self, step: int, start: int, stop: int) -> Batch:
        if start == stop:  # a process none of whose devices is in the mesh
            return jax.tree.map(lambda x: np.zeros((0, *np.shape(x)), np.asarray(x).dtype),
                                self._example())
        base = step * self.global_batch
        examples = [self.dataset[base + r] for r in range(start, stop)]
        out = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *examples)
        with self._lock:
            self.examples_read += stop - start
            self.bytes_read += sum(x.nbytes for x in jax.tree.leaves(out))
        return out

    def _retarget(self, served: tuple[int, int, int]) -> None:
        """Keep reads of the `prefetch` steps after `served` with its rows; cancel the
        rest (an old mesh's rows, steps already passed). Holds the lock."""
        step, start, stop = served
        wanted = {(s, start, stop) for s in range(step + 1, step + 1 + self.prefetch)}
        for key in [k for k in self._ahead if k not in wanted]:
            self._ahead.pop(key).cancel()
        for key in sorted(wanted - set(self._ahead)):
            self._ahead[key] = self._pool.submit(self._read, *key)

    @property
    def queued(self) -> list[tuple[int, int, int]]:
        """The reads queued ahead: (step, first row, end row), in order."""
        with self._lock:
            return sorted(self._ahead)

    def wait(self) -> None:
        """Wait for the reads queued now (to measure what was read)."""
        with self._lock:
            queued = list(self._ahead.values())
        concurrent.futures.wait(queued)

    def close(self) -> None:
        """Stop prefetching (queued reads are cancelled, running ones finish)."""
        with self._lock:
            for future in self._ahead.values():
                future.cancel()
            self._ahead.clear()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> Batches:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Batches({self.num_examples} examples, global_batch={self.global_batch}, "
                f"seed={self.seed}, shuffle={self.shuffle}, prefetch={self.prefetch})")


def _map_dataset(dataset: Any) -> grain.MapDataset:
    """`dataset` as a grain `MapDataset`; refuse what is not random access."""
    if isinstance(dataset, grain.MapDataset):
        return dataset
    if isinstance(dataset, grain.IterDataset) or isinstance(dataset, collections.abc.Iterator):
        raise InvalidArgument(
            f"{type(dataset).__name__} is not random access: meshscale keys batches by step "
            "(the checkpoint's step is the data position), so give a grain MapDataset or a "
            "random-access source (grain.sources.ArrayRecordDataSource)")
    if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
        raise InvalidArgument(
            f"{type(dataset).__name__} has no __len__/__getitem__: give a grain MapDataset "
            "or a random-access source (grain.sources.ArrayRecordDataSource)")
    return grain.MapDataset.source(dataset)


def _keys(spec: Batch) -> str:
    return str(sorted(spec)) if isinstance(spec, dict) else str(jax.tree.structure(spec))
