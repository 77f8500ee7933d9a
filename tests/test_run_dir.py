"""A run directory is refused, moved aside or reopened, and nothing in it is ever deleted."""

import os

import pytest

from meshscale.app.run_dir import RunDirRefused, aside_path, checkpoint_steps, plan, take
from meshscale.errors import MeshscaleError
from tests.helpers import contents, read_only_tmpfs


def make_run(root, steps=(40, 80, 120)):
    """A previous run's directory as the demos leave it (a temporary step in flight too)."""
    for step in steps:
        (root / "checkpoints" / "state" / str(step)).mkdir(parents=True)
        (root / "checkpoints" / "state" / str(step) / "array").write_bytes(os.urandom(64))
    (root / "checkpoints" / "state" / "130.orbax-checkpoint-tmp-1").mkdir()
    (root / "report.json").write_text('{"steps": [], "events": []}')
    return root


def test_committed_steps_are_the_bare_step_directories(tmp_path):
    assert checkpoint_steps(make_run(tmp_path)) == [40, 80, 120]
    assert checkpoint_steps(tmp_path / "nowhere") == []


def test_a_directory_holding_a_run_is_refused_naming_both_flags_and_kept_intact(tmp_path):
    run = make_run(tmp_path / "run")
    before = contents(run)
    with pytest.raises(RunDirRefused) as refused:
        plan(str(run), resume=False, overwrite=False)
    assert str(refused.value) == (
        f"--run-dir {run} holds a run (checkpoints up to step 120): pass --resume to continue "
        f"it, or --overwrite to start over (the old run is moved to {run}.old-1, nothing is "
        f"deleted)")
    assert isinstance(refused.value, MeshscaleError)  # the CLI prints it in one line, exit 2
    with pytest.raises(RunDirRefused, match="pass --overwrite to start over"):
        plan(str(run), resume=None, overwrite=False)  # a command without --resume
    assert contents(run) == before


def test_a_directory_of_other_files_is_refused_and_left_as_it_was(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(RunDirRefused, match=r"holds 1 entry \(precious.txt\): choose another "
                                            r"--run-dir, or pass --overwrite"):
        plan(str(tmp_path), resume=False, overwrite=False)
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_overwrite_moves_the_old_run_to_the_first_free_old_n(tmp_path):
    run = make_run(tmp_path / "run")
    (run / "jax_cache").mkdir()
    (run / "jax_cache" / "entry").write_bytes(b"compiled")
    before = contents(run)
    (tmp_path / "run.old-1").mkdir()  # taken by an earlier overwrite
    planned = plan(str(run), resume=False, overwrite=True)
    assert planned.move_aside_to == str(tmp_path / "run.old-2")
    assert take(planned, reuse=("jax_cache",)) == str(tmp_path / "run.old-2")
    assert contents(tmp_path / "run.old-2") == before
    assert os.listdir(run) == ["jax_cache"]  # a new run, with the old compiles copied
    assert (run / "jax_cache" / "entry").read_bytes() == b"compiled"
    assert aside_path(str(run) + "/") == str(tmp_path / "run.old-3")


def test_a_new_or_empty_directory_needs_no_flag_and_missing_parents_are_made(tmp_path):
    (tmp_path / "empty").mkdir()
    for run in (tmp_path / "empty", tmp_path / "a" / "b" / "run"):
        planned = plan(str(run), resume=False, overwrite=True)
        assert planned.move_aside_to is None and take(planned) is None
        assert run.is_dir()
    assert sorted(os.listdir(tmp_path)) == ["a", "empty"]


def test_resume_with_nothing_to_resume_is_refused(tmp_path):
    with pytest.raises(RunDirRefused, match="nothing to resume: --run-dir .* does not exist: "
                                            "run without --resume"):
        plan(str(tmp_path / "nowhere"), resume=True, overwrite=False)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "report.json").write_text("{}")
    with pytest.raises(RunDirRefused, match="nothing to resume: --run-dir .* holds a run with "
                                            "no checkpoint: pass --overwrite instead"):
        plan(str(tmp_path / "run"), resume=True, overwrite=False)
    assert not (tmp_path / "nowhere").exists()
    make_run(tmp_path / "run2")
    assert plan(str(tmp_path / "run2"), resume=True, overwrite=False).latest_step == 120


def test_resume_and_overwrite_together_are_refused(tmp_path):
    with pytest.raises(RunDirRefused, match="--resume and --overwrite together: pass one"):
        plan(str(make_run(tmp_path)), resume=True, overwrite=True)


def test_a_file_is_refused_as_run_dir_or_as_one_of_its_parents(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunDirRefused, match=r"^--run-dir \S+/file: it is a file, not a "
                                            r"directory: choose a writable directory$"):
        plan(str(tmp_path / "file"), resume=False, overwrite=False)
    with pytest.raises(RunDirRefused, match=r"^--run-dir \S+/file/run: \S+/file is a file, not "
                                            r"a directory: choose a writable directory$"):
        plan(str(tmp_path / "file" / "run"), resume=False, overwrite=False)


def test_a_read_only_location_is_refused_naming_run_dir(tmp_path):
    with read_only_tmpfs(tmp_path / "ro") as ro:
        for run in (ro, ro / "run", ro / "a" / "run"):
            with pytest.raises(RunDirRefused, match=rf"^--run-dir {run}: {ro} is on a read-only "
                                                    rf"file system: choose a writable directory$"):
                plan(str(run), resume=False, overwrite=False)
