"""The examples run as their docstrings say: flags parse, and a short run ends cleanly."""

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
RAY_ELASTIC = ROOT / "examples" / "ray_elastic.py"


def run_example(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, str(RAY_ELASTIC), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_ray_elastic_help_shows_steps_and_p_min_with_their_defaults():
    done = run_example("--help", timeout=60)
    assert done.returncode == 0, done.stderr
    words = " ".join(done.stdout.split())  # argparse wraps help lines
    assert "--steps STEPS train until this step" in words and "(default 300)" in words
    assert "--p-min P_MIN fewest pipeline stages" in words and "(default 2)" in words
    assert run_example("--checkpoint-dir", "x", "--steps", "many").returncode == 2


def test_ray_elastic_trains_the_steps_asked_on_one_device_and_exits_cleanly(tmp_path):
    """--steps and --p-min reach the loop: 12 steps with p_min 1 on a single device (the
    default p_min 2 would refuse one device); the trainer is closed, so no write is cut
    off at exit."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    env = {**os.environ, "XLA_FLAGS": " ".join(flags), "JAX_PLATFORMS": "cpu"}
    done = run_example("--checkpoint-dir", str(tmp_path / "ex"), "--model", "mlp",
                       "--steps", "12", "--p-min", "1", env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    printed = [line.split()[0] for line in done.stdout.splitlines() if line.strip()]
    assert printed == ["10"]  # the loop prints every 10th step, and stopped at 12
    assert "Traceback" not in done.stderr
    assert (tmp_path / "ex" / "state" / "12" / "commit_success.txt").is_file()  # close()


def test_multihost_files_help_shows_its_run_directory_and_steps():
    """The multi-process file-reading example parses its flags (its data path runs under
    `meshscale launch` in tests/test_data.py)."""
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "multihost_files.py"),
                           "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    words = " ".join(done.stdout.split())
    assert "run run directory" in words and "--steps STEPS train until this step" in words
    assert "(default: 40)" in words
