"""A command's run directory: taken for a new run or reopened to resume, never deleted.

`meshscale demo` and `meshscale ray-demo` write everything a run makes (checkpoints,
report, compile cache, device file) inside one directory, ``--run-dir``. Before a run
starts, `plan` looks at that directory without changing anything and refuses, in one
line that names the flag to pass, a directory the command cannot use as asked: one that
holds a previous run or other files (unless ``--resume`` or ``--overwrite`` says what to
do with it), ``--resume`` with nothing to resume, a path that is a file, a read-only or
forbidden location. `take` then makes the directory, first moving an old one aside to
``RUN_DIR.old-N`` when ``--overwrite`` asked for that.

Never: delete, empty or rewrite anything already in a run directory; an old one is only
ever renamed, to the first free ``RUN_DIR.old-N`` beside it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil

from meshscale.errors import RunDirRefused

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"  # the demos' checkpoint_dir inside a run directory
STEPS = "state"  # where ElasticTrainer keeps its steps inside checkpoint_dir
# Files that only a run writes: a directory holding one of them holds a run.
RUN_MARKERS = (CHECKPOINTS, "report.json", "devices.txt", "progress.jsonl", "jax_cache")


@dataclasses.dataclass(frozen=True)
class RunDirPlan:
    """What `take` will do: ``path`` as given, resumed or new, moved aside first or not."""

    path: str
    resume: bool
    move_aside_to: str | None  # where `take` renames the directory there now
    latest_step: int | None  # the newest committed checkpoint step in it


def checkpoint_steps(run_dir: str | os.PathLike) -> list[int]:
    """The committed checkpoint steps of the run in `run_dir`, oldest first.

    A step is committed once Orbax has renamed its directory from the temporary name it
    writes under (``10.orbax-checkpoint-tmp-...``) to the bare step number.
    """
    steps = os.path.join(run_dir, CHECKPOINTS, STEPS)
    try:
        names = os.listdir(steps)
    except OSError:
        return []
    return sorted(int(n) for n in names if n.isdigit() and os.path.isdir(os.path.join(steps, n)))


def aside_path(run_dir: str) -> str:
    """The first free ``RUN_DIR.old-N`` (N = 1, 2, ...) beside `run_dir`."""
    base = run_dir.rstrip(os.sep) or run_dir
    n = 1
    while os.path.lexists(f"{base}.old-{n}"):
        n += 1
    return f"{base}.old-{n}"


def describe(run_dir: str) -> str:
    """What an existing, non-empty `run_dir` holds, in words."""
    steps = checkpoint_steps(run_dir)
    if steps:
        return f"holds a run (checkpoints up to step {steps[-1]})"
    names = sorted(os.listdir(run_dir))
    if any(n in RUN_MARKERS for n in names):
        return "holds a run with no checkpoint"
    shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    return f"holds {len(names)} entr{'y' if len(names) == 1 else 'ies'} ({shown})"


def plan(run_dir: str | os.PathLike, *, resume: bool | None, overwrite: bool) -> RunDirPlan:
    """Check `run_dir` for a run started with these flags; changes nothing on disk.

    Args:
      run_dir: the ``--run-dir`` as the user wrote it (messages quote it so).
      resume: ``--resume`` was passed; None for a command that has no ``--resume``.
      overwrite: ``--overwrite`` was passed: an existing directory is moved aside.

    Raises `RunDirRefused` (one line naming the flag to pass) when the directory holds
    anything and neither flag says what to do with it, when ``--resume`` finds no
    checkpoint, when both flags are passed, or when the path cannot be written.
    """
    path = os.fspath(run_dir)
    if resume and overwrite:
        raise RunDirRefused(f"--resume and --overwrite together: pass one (--resume continues "
                            f"the run in {path}, --overwrite moves it aside and starts over)")
    exists = os.path.isdir(path)
    if os.path.lexists(path) and not exists:
        raise RunDirRefused(f"--run-dir {path}: it is a file, not a directory: "
                            f"choose a writable directory")
    _require_writable(path, where=path if exists else _nearest_existing(path))
    contents = exists and bool(os.listdir(path))
    aside = aside_path(path) if contents else None
    steps = checkpoint_steps(path) if contents else []
    if resume:
        if not steps:
            held = (f"{path} {describe(path)}" if contents else
                    f"{path} is empty" if exists else f"{path} does not exist")
            hint = (f"pass --overwrite instead to start over (it is moved to {aside}, nothing "
                    f"is deleted)" if contents else "run without --resume to start a new run")
            raise RunDirRefused(f"--resume: nothing to resume: --run-dir {held}: {hint}")
        return RunDirPlan(path, resume=True, move_aside_to=None, latest_step=steps[-1])
    if contents and not overwrite:
        what = describe(path)
        if not what.startswith("holds a run"):
            raise RunDirRefused(f"--run-dir {path} {what}: choose another --run-dir, or pass "
                                f"--overwrite to start there (what it holds is moved to "
                                f"{aside}, nothing is deleted)")
        options = ("pass --resume to continue it, or --overwrite to start over"
                   if steps and resume is not None else "pass --overwrite to start over")
        raise RunDirRefused(f"--run-dir {path} {what}: {options} (the old run is moved to "
                            f"{aside}, nothing is deleted)")
    if aside is not None:
        _require_writable(path, where=os.path.dirname(os.path.abspath(path)))
    return RunDirPlan(path, resume=False, move_aside_to=aside,
                      latest_step=steps[-1] if steps else None)


def take(planned: RunDirPlan, *, reuse: tuple[str, ...] = ()) -> str | None:
    """Make the planned run directory (parents too), moving an old one aside first.

    Args:
      planned: from `plan`.
      reuse: entries of a directory moved aside (caches, e.g. ``jax_cache``) that the new
        run starts with: copied (not linked: a cache may rewrite its files in place), so
        the old directory keeps them as they were.

    Returns where the old directory went (None when nothing was moved). Raises
    `RunDirRefused` when the file system refuses.
    """
    moved = None
    try:
        if planned.move_aside_to is not None:
            moved = aside_path(planned.path)  # still free? another run may have taken it
            os.rename(planned.path, moved)
        os.makedirs(planned.path, exist_ok=True)
    except OSError as e:
        raise RunDirRefused(f"--run-dir {planned.path}: {e.strerror or e}: "
                            f"choose a writable directory") from e
    for name in reuse if moved is not None else ():
        if os.path.isdir(os.path.join(moved, name)):
            try:
                shutil.copytree(os.path.join(moved, name), os.path.join(planned.path, name))
            except OSError as e:  # a cache: the run only compiles again
                log.warning("could not reuse %s from %s: %s", name, moved, e)
    return moved


def _nearest_existing(path: str) -> str:
    """The deepest existing directory on the way to `path` (parents missing are fine)."""
    where = os.path.dirname(os.path.abspath(path))
    while not os.path.lexists(where):
        where = os.path.dirname(where)
    return where


def _require_writable(path: str, *, where: str) -> None:
    """`where` (the run dir, or the place it is to be made in) must take new entries."""
    if not os.path.isdir(where):
        reason = f"{where} is a file, not a directory"
    elif os.statvfs(where).f_flag & os.ST_RDONLY:
        reason = f"{where} is on a read-only file system"
    elif not os.access(where, os.W_OK | os.X_OK):
        reason = f"no permission to write in {where}"
    else:
        return
    raise RunDirRefused(f"--run-dir {path}: {reason}: choose a writable directory")
