"""Byte-level text that ships with Python: the standard library's own source files.

No download: the corpus is read from the running interpreter's `Lib/` directory, in a
fixed file order, so every machine with the same Python version sees the same bytes.

For the grain data path (`meshscale.data.Batches`), `write_records` stores the text as an
ArrayRecord file (fixed windows with `windows`, or variable-length documents with
`documents`) and `records` reads it back as a random-access grain `MapDataset` of
``{"tokens": int32[n]}``.
"""

from __future__ import annotations

import os
import pathlib
import sysconfig
from collections.abc import Iterable, Sequence

import numpy as np


def stdlib_text(max_bytes: int = 4_000_000) -> bytes:
    """Up to `max_bytes` of the standard library's .py sources, concatenated."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    chunks, size = [], 0
    for path in sorted(root.glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        size += len(data)
        if size >= max_bytes:
            break
    if not chunks:
        raise FileNotFoundError(f"no .py files under {root}: cannot build the text corpus")
    return b"".join(chunks)[:max_bytes]


class ByteBatches:
    """Random windows of `seq_len + 1` bytes, `batch_size` per batch; seeded, endless.

    `batch(i)` is a pure function of (seed, i), so a resumed run sees the same data.
    """

    def __init__(self, text: bytes, *, seq_len: int, batch_size: int, seed: int = 0):
        self.data = np.frombuffer(text, dtype=np.uint8)
        if len(self.data) <= seq_len + 1:
            raise ValueError(f"text of {len(self.data)} bytes is too short for seq_len {seq_len}")
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed

    def batch(self, index: int) -> dict:
        rng = np.random.default_rng([self.seed, index])
        starts = rng.integers(0, len(self.data) - self.seq_len - 1, size=self.batch_size)
        windows = np.stack([self.data[s: s + self.seq_len + 1] for s in starts])
        return {"tokens": windows.astype(np.int32)}

    def __iter__(self):
        i = 0
        while True:
            yield self.batch(i)
            i += 1


def windows(text: bytes, length: int) -> list[bytes]:
    """`text` cut into consecutive, non-overlapping records of `length` bytes (for a model
    of ``seq_len``: ``length = seq_len + 1``); the tail shorter than `length` is dropped."""
    return [text[i: i + length] for i in range(0, len(text) - length + 1, length)]


def documents(text: bytes, *, max_bytes: int = 512) -> list[bytes]:
    """`text` split at blank lines into documents of varying length (each at most
    `max_bytes`): what packing (`meshscale.data.pack_documents`) puts together."""
    return [block[:max_bytes] for block in text.split(b"\n\n") if block.strip()]


def write_records(path: str | os.PathLike, records: Iterable[bytes]) -> pathlib.Path:
    """Write `records` as one ArrayRecord file (random access by record number)."""
    from array_record.python.array_record_module import ArrayRecordWriter

    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = ArrayRecordWriter(str(path), "group_size:1")
    try:
        for record in records:
            writer.write(record)
    finally:
        writer.close()
    return path


def records(path: str | os.PathLike | Sequence[str | os.PathLike]):
    """The ArrayRecord file at `path` (or the shards, in order, of a list of paths) as a
    grain `MapDataset` of ``{"tokens": int32[n]}``."""
    import grain

    paths = [str(p) for p in path] if isinstance(path, list | tuple) else str(path)
    source = grain.sources.ArrayRecordDataSource(paths)
    return grain.MapDataset.source(source).map(_tokens)


def _tokens(record: bytes) -> dict:
    return {"tokens": np.frombuffer(record, dtype=np.uint8).astype(np.int32)}
