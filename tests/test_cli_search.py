"""`meshscale search` on the command line (subprocesses: --devices must act before jax starts)."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from meshscale.app.cli import DEVICE_COUNT_FLAG, device_environment, main

ROOT = pathlib.Path(__file__).resolve().parents[1]


def meshscale_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `python -m meshscale.app.cli` in a fresh process with no device flags of our own."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env["COLUMNS"] = "200"
    return subprocess.run([sys.executable, "-m", "meshscale", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_devices_flag_sets_simulated_device_count_before_jax_starts():
    # with the flag ignored the process would see 1 CPU device and say so instead
    proc = meshscale_cli("search", "--model", "mlp", "--devices", "3", "--p-min", "4")
    assert proc.returncode == 2, proc.stderr
    assert "p_min=4 needs at least 4 devices, only 3 available" in proc.stderr


def test_search_prints_table_and_decision_and_writes_json(tmp_path):
    out = tmp_path / "search.json"
    proc = meshscale_cli("search", "--model", "mlp", "--devices", "2", "--p-min", "2",
                         "--batch", "8", "--warmup", "1", "--steps", "2", "--json", str(out),
                         "--run-dir", str(tmp_path / "run"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for column in ("mesh", "kind", "compile s", "step s", "samples/s", "per device", "memory",
                   "status"):
        assert column in proc.stdout
    assert "2x1/m4" in proc.stdout and "start-up (no baseline)" in proc.stdout
    data = json.loads(out.read_text())
    assert data["num_devices"] == 2 and data["global_batch"] == 8
    decision = data["decision"]
    assert [r["shape"] for r in decision["results"]] == ["2x1/m4"]
    assert decision["results"][0]["status"] == "ok" and decision["switch"] is True
    assert decision["best"]["shape"] == "2x1/m4" and decision["max_useful_devices"] == 2
    assert decision["improvement"] is None  # nan (no baseline) is written as null
    assert data["words"].startswith("2 devices: start-up")
    assert any((tmp_path / "run" / "jax_cache").iterdir())  # persistent compile cache
    # the cost model's prediction beside the measurement, and its calibration kept
    [pred] = decision["predictions"]
    assert pred["shape"] == "2x1/m4" and pred["verdict"].startswith("measured")
    assert pred["measured_samples_per_second"] == decision["results"][0]["samples_per_second"]
    assert pred["samples_per_second"] > 0 and "predicted vs measured" in proc.stdout
    saved = json.loads((tmp_path / "run" / "cost_model.json").read_text())
    assert [o[0] for o in saved["observations"]] == ["2x1/m4"]


def test_plan_ranks_a_cluster_that_is_not_there(tmp_path, capsys):
    # in this process: --plan makes no devices (256 simulated ones would take minutes)
    out = tmp_path / "plan.json"
    assert main(["search", "--plan", "--devices", "256", "--model", "mlp", "--batch", "256",
                 "--p-min", "2", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    ranks = [p["rank"] for p in data["predictions"] if p["rank"]]
    assert ranks == list(range(1, len(ranks) + 1)) and len(data["predictions"]) >= len(ranks)
    assert data["num_devices"] == 256 and "predicted best" in data["words"]
    assert "plan took" in capsys.readouterr().out
    assert main(["search", "--plan", "--model", "llama-70b", "--p-min", "auto"]) == 2
    assert "--plan needs an int --p-min" in capsys.readouterr().err


def test_no_command_prints_help_and_bad_p_min_is_a_usage_error(capsys):
    assert main([]) == 2
    assert "search" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["search", "--p-min", "two"])
    assert exc.value.code == 2
    assert "--p-min takes an int or 'auto'" in capsys.readouterr().err


def test_device_environment_is_restored_after_the_command():
    before = os.environ.get("XLA_FLAGS")
    with device_environment(3, "cpu"):
        flags = os.environ["XLA_FLAGS"].split()
        assert f"{DEVICE_COUNT_FLAG}=3" in flags
        assert sum(f.startswith(DEVICE_COUNT_FLAG) for f in flags) == 1
    assert os.environ.get("XLA_FLAGS") == before


def test_search_runs_a_users_own_model_from_module_and_factory():
    proc = meshscale_cli("search", "--model", "tests.helpers:cli_factory", "--devices", "2",
                         "--p-min", "2", "--batch", "8", "--warmup", "0", "--steps", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2x1/m" in proc.stdout and "tests.helpers:cli_factory" in proc.stdout
    bad = meshscale_cli("search", "--model", "no_such_module:make", "--devices", "2")
    assert bad.returncode != 0 and "cannot load model 'no_such_module:make'" in bad.stderr


def test_repeats_and_microbatches_flags_parse_and_refuse_bad_values(capsys):
    from meshscale.app.cli import _counts

    assert _counts("--repeats", "1,2")("auto") is None
    assert _counts("--repeats", "1,2")("all") == "all"
    assert _counts("--repeats", "1,2")("1, 2") == [1, 2]
    for bad in ("two", "0,2", ""):
        with pytest.raises(SystemExit) as exc:
            main(["search", "--repeats", bad])
        assert exc.value.code == 2
        assert "--repeats takes auto, all or a list like 1,2" in capsys.readouterr().err


def test_p_min_auto_without_a_memory_budget_says_how_to_give_one(capsys):
    assert main(["search", "--model", "mlp", "--devices", "2", "--p-min", "auto",
                 "--batch", "8"]) == 2
    err = capsys.readouterr().err
    assert "meshscale search: error: p_min='auto' needs a memory budget" in err
    assert "--device-memory 2GiB" in err
