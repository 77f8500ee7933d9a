"""Packing for language models: several documents in one row, with segment ids.

`pack_documents(dataset, length, documents_per_row=k)` groups every `k` consecutive
documents of a grain `MapDataset` (grain's `batch`, kept as a list) and packs each group
into one row of `length` tokens with grain's `Map` transform `PackDocuments`: documents in
order, each cut to the room left, the rest padding. The row carries ``segments`` (1, 2,
... per document, 0 on padding), and optionally ``positions`` (restarting at each
document), the form `models/llama.py` reads (attention within a segment, positions from
the segments, targets only inside a segment).

Random access survives packing: packed row ``j`` is documents ``j*k ... j*k + k - 1``,
so `Batches` can key packed rows by step. Never: let a row depend on another row's
documents (no carry-over of a cut document's tail), which would need iterator state.
"""

from __future__ import annotations

from collections.abc import Sequence

import grain
import numpy as np

from meshscale.errors import InvalidArgument


class PackDocuments(grain.transforms.Map):
    """A list of documents (``{key: int[n]}``) -> one row ``{key: int32[length],
    "segments": int32[length]}`` (and ``"positions"`` when asked)."""

    def __init__(self, length: int, *, key: str = "tokens", pad_id: int = 0,
                 positions: bool = False):
        if not isinstance(length, int) or length < 2:
            raise InvalidArgument(f"length must be an int >= 2, got {length!r}")
        self.length, self.key, self.pad_id, self.positions = length, key, pad_id, positions

    def map(self, documents: Sequence[dict]) -> dict:
        tokens = np.full(self.length, self.pad_id, np.int32)
        segments = np.zeros(self.length, np.int32)
        positions = np.zeros(self.length, np.int32)
        at = 0
        for number, document in enumerate(documents, start=1):
            if self.key not in document:
                raise InvalidArgument(f"a document has keys {sorted(document)}, not "
                                      f"{self.key!r}: pass key= or map the dataset first")
            piece = np.asarray(document[self.key]).reshape(-1)[: self.length - at]
            if not len(piece):
                break
            tokens[at: at + len(piece)] = piece
            segments[at: at + len(piece)] = number
            positions[at: at + len(piece)] = np.arange(len(piece))
            at += len(piece)
        row = {self.key: tokens, "segments": segments}
        if self.positions:
            row["positions"] = positions
        return row


def pack_documents(dataset: grain.MapDataset, length: int, *, documents_per_row: int,
                   key: str = "tokens", pad_id: int = 0,
                   positions: bool = False) -> grain.MapDataset:
    """Rows of `length` tokens, each packing `documents_per_row` consecutive documents
    (`PackDocuments`); a random-access `MapDataset` of ``ceil(len / documents_per_row)``
    rows."""
    if not isinstance(documents_per_row, int) or documents_per_row < 1:
        raise InvalidArgument(f"documents_per_row must be an int >= 1, got "
                              f"{documents_per_row!r}")
    return dataset.batch(documents_per_row, batch_fn=list).map(
        PackDocuments(length, key=key, pad_id=pad_id, positions=positions))
