"""Where a run's files live: a local directory or a cloud URL (``gs://bucket/run``).

Checkpoints and the persistent compilation cache are addressed through `etils.epath`,
the path type Orbax itself uses, so the same code writes to local disk and to object
stores. Never: pass such a directory through `pathlib.Path(...).absolute()` or
`os.path.abspath`, which turn ``gs://bucket/run`` into ``/cwd/gs:/bucket/run``.
"""

from __future__ import annotations

import os

from etils import epath


def run_path(directory: str | os.PathLike) -> epath.Path:
    """`directory` as an `epath.Path`: a URL (``scheme://...``) kept exactly as given, a
    local path made absolute (so a later change of working directory cannot move it)."""
    text = os.fspath(directory)
    if "://" in text:
        return epath.Path(text)
    return epath.Path(os.path.abspath(text))
