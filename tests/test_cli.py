"""The `meshscale` command line as a new user meets it: help with defaults, one set of
defaults, your own model from the current directory, -v/-q, progress and ruled-out
meshes explained, flags that are refused with the fix, wide tables in files, events in
words. (`meshscale search`'s table and JSON: test_cli_search.py; the demo: test_demo.py.)
"""

import argparse
import dataclasses
import io
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest
from rich.console import Console

from meshscale.app import cli, terminal
from meshscale.app.commands.options import DEFAULTS, DefaultsFormatter
from meshscale.app.demo import DemoConfig, _event_printer
from meshscale.app.ray_demo import RayDemoConfig
from meshscale.elastic import events
from meshscale.planning.search import decide
from meshscale.planning.space import ruled_out

ROOT = pathlib.Path(__file__).resolve().parents[1]
FAST_XLA = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
# As the `meshscale` console script runs: the script's folder, not the current directory,
# is first on the import path.
CONSOLE_SCRIPT = ("import sys; sys.path.pop(0); from meshscale.app.cli import main; "
                  "sys.exit(main())")


def meshscale(*args: str, cwd=ROOT, timeout: float = 300) -> subprocess.CompletedProcess:
    """The command in a fresh process (--devices acts before jax starts), output a pipe,
    COLUMNS unset: as when the output goes to a file."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("XLA_FLAGS", "JAX_PLATFORMS", "COLUMNS")}
    env["XLA_FLAGS"] = FAST_XLA  # the CLI adds its device count to these
    return subprocess.run([sys.executable, "-c", CONSOLE_SCRIPT, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_option_of_every_command_has_help_showing_its_default():
    parser = cli.build_parser()
    commands = subparsers(parser)
    assert set(commands) == {"search", "demo", "report", "launch", "ray-demo"}
    checked = 0
    for name, p in [("meshscale", parser), *commands.items()]:
        formatter = DefaultsFormatter(prog=name)
        for action in p._actions:
            if isinstance(action, argparse._HelpAction | argparse._SubParsersAction) \
                    or action.help == argparse.SUPPRESS:
                continue
            assert action.help, f"{name} {action.option_strings or action.dest}: no help"
            if not action.option_strings:
                continue  # a positional has no default
            shown = formatter._get_help_string(action) % {"default": action.default}
            assert "default" in shown, f"{name} {action.option_strings}: {shown!r}"
            if action.default is None:
                assert "default: None" not in shown, f"{name} {action.option_strings}: say " \
                                                     "what no value means"
            elif not isinstance(action.default, bool) and action.default != argparse.SUPPRESS:
                assert f"default: {action.default}" in shown, (name, shown)
            checked += 1
    assert checked >= 40
    assert "(default: 24)" in commands["search"].format_help().replace("\n", " ")


def test_demo_search_and_ray_demo_share_one_set_of_defaults():
    commands = subparsers(cli.build_parser())
    parsed = {name: commands[name].parse_args([]) for name in ("demo", "search", "ray-demo")}
    for name, args in parsed.items():
        assert (args.p_min, args.batch, args.state_sharding, args.seed) == (
            DEFAULTS.p_min, DEFAULTS.global_batch, DEFAULTS.state_sharding, DEFAULTS.seed), name
    assert parsed["demo"].model == parsed["search"].model == DEFAULTS.model
    assert parsed["ray-demo"].model == DEFAULTS.ray_model
    assert parsed["demo"].devices == parsed["search"].devices == DEFAULTS.devices
    # the configs the commands build agree, so a resume line leaves no default out
    demo, ray = DemoConfig(), RayDemoConfig()
    assert (demo.model, demo.p_min, demo.global_batch, demo.state_sharding, demo.seed,
            demo.devices) == (DEFAULTS.model, DEFAULTS.p_min, DEFAULTS.global_batch,
                              DEFAULTS.state_sharding, DEFAULTS.seed, DEFAULTS.devices)
    assert (ray.model, ray.p_min, ray.global_batch, ray.state_sharding, ray.seed) == (
        DEFAULTS.ray_model, DEFAULTS.p_min, DEFAULTS.global_batch, DEFAULTS.state_sharding,
        DEFAULTS.seed)


def test_model_takes_registry_names_and_factories_in_every_command(capsys):
    commands = subparsers(cli.build_parser())
    for name in ("demo", "search", "ray-demo"):
        for model in ("gpt-small", "mlp", "mymodels.lm:make"):
            assert commands[name].parse_args(["--model", model]).model == model
        with pytest.raises(SystemExit):
            commands[name].parse_args(["--model", "resnet"])
        assert "--model takes one of gpt-tiny, gpt-small, llama-tiny, mlp or " \
               "package.module:factory, got 'resnet'" in capsys.readouterr().err


def test_v_and_q_go_before_or_after_the_command(capsys):
    parser = cli.build_parser()
    for argv, loud in ((["-v", "report", "r"], (True, False)), (["report", "r", "-q"],
                       (False, True)), (["report", "r"], (False, False))):
        args = parser.parse_args(argv)
        assert (args.verbose, args.quiet) == loud, argv
    with pytest.raises(SystemExit):
        cli.main(["-v", "report", "r", "-q"])
    assert "-v and -q together: pick one" in capsys.readouterr().err


def test_ray_demo_refuses_devices_in_one_line_naming_the_fix(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["ray-demo", "--devices", "8"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err == ("meshscale ray-demo: error: --devices: ray-demo schedules workers, not "
                   "devices: give each worker devices with --devices-per-worker N, and the "
                   "workers over time with --schedule WORKERS@STEP,...\n")
    # no flag is taken for a longer one any more (argparse's prefix matching)
    with pytest.raises(SystemExit):
        cli.main(["search", "--dev", "4"])
    assert "unrecognized arguments: --dev 4" in capsys.readouterr().err


def test_ray_demo_schedule_errors_speak_of_workers(capsys):
    assert cli.main(["ray-demo", "--schedule", "9@0,1@30"]) == 2
    assert capsys.readouterr().err == ("meshscale ray-demo: error: bad --schedule '9@0,1@30': "
                                       "9 workers is outside 1..8 (at most 8 workers)\n")
    assert cli.main(["ray-demo", "--schedule", "two@0"]) == 2
    err = capsys.readouterr().err
    assert "write WORKERS@STEP,... e.g. 1@0,3@30,1@60" in err and "device" not in err
    assert cli.main(["demo", "--schedule", "9@0"]) == 2  # the demo's still speak of devices
    assert "9 devices is outside 1..8 (raise --devices)" in capsys.readouterr().err


def test_importing_meshscale_configures_no_logging():
    code = ("import logging, meshscale; print(logging.getLogger().handlers, "
            "logging.getLogger('meshscale').handlers)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[] [<NullHandler (NOTSET)>]"


def test_verbose_search_logs_shows_progress_and_explains_what_it_ruled_out():
    """`search --batch 7 --devices 4` used to say only "Maximum useful devices: 1 of 4"."""
    proc = meshscale("-v", "search", "--model", "mlp", "--devices", "4", "--p-min", "1",
                     "--batch", "7", "--warmup", "0", "--steps", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "INFO meshscale.planning.search: search on 4 devices" in proc.stderr
    out = proc.stdout
    for i, shape in enumerate(["1x1/m1", "2x1/m7", "3x1/m7", "4x1/m7"], 1):
        assert f"try-run {i}/4: {shape}" in out  # a bar per try-run, with its result
    ruled = out[out.index("ruled out:"):].splitlines()
    assert ruled[1:3] == [
        "  1x4, 1x3, 1x2: global batch 7 does not split into 4, 3 or 2 replicas: 1x1 (1 of "
        "4 devices) is tried instead",
        "  2x2: global batch 7 does not split into 2 replicas: 2x1 (2 of 4 devices) is tried "
        "instead"]
    # written to a pipe, the table is not cut to 80 columns
    assert max(len(line) for line in out.splitlines() if "2x1/m7" in line) > 80


def test_quiet_search_prints_the_decision_alone(tmp_path):
    proc = meshscale("-q", "search", "--model", "mlp", "--devices", "2", "--p-min", "2",
                     "--batch", "8", "--warmup", "0", "--steps", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("2 devices: start-up") and proc.stdout.count("\n") == 1
    assert "INFO" not in proc.stderr and "WARNING" not in proc.stderr


REGRESSOR = textwrap.dedent('''
    """The README's own model: example_batch(self, n) takes no seed."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import meshscale


    class Block(nnx.Module):
        def __init__(self, width, rngs):
            self.mlp = nnx.Linear(width, width, rngs=rngs)

        def __call__(self, h):
            return h + jax.nn.gelu(self.mlp(h))


    class Regressor(meshscale.LayerStack):
        def __init__(self, layers=4, width=8, *, rngs):
            self.num_layers = layers
            self.inp = nnx.Linear(4, width, rngs=rngs)
            self.blocks = meshscale.stack_layers(lambda r: Block(width, r), layers, rngs)
            self.out = nnx.Linear(width, 1, rngs=rngs)

        def embed(self, batch):
            return self.inp(batch["x"])

        def head_loss(self, h, batch):
            return jnp.mean((self.out(h) - batch["y"]) ** 2)

        def example_batch(self, n):
            return {"x": jnp.ones((n, 4)), "y": jnp.zeros((n, 1))}


    def make():
        return Regressor(rngs=nnx.Rngs(0))
''')


def test_a_model_from_the_current_directory_with_example_batch_n(tmp_path):
    (tmp_path / "regmod.py").write_text(REGRESSOR)
    proc = meshscale("search", "--model", "regmod:make", "--devices", "2", "--p-min", "2",
                     "--batch", "8", "--warmup", "0", "--steps", "1", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "meshscale search: regmod:make" in proc.stdout and "2x1/m" in proc.stdout


def test_the_demo_trains_a_model_from_the_current_directory(tmp_path, monkeypatch, capsys):
    (tmp_path / "regmod_demo.py").write_text(REGRESSOR)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.setitem(os.environ, "COLUMNS", "150")
    assert cli.main(["-q", "demo", "--model", "regmod_demo:make", "--steps", "4",
                     "--schedule", "2@0", "--check-every", "2", "--checkpoint-every", "2",
                     "--batch", "8", "--run-dir", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "report.json").exists()
    assert capsys.readouterr().out == ""  # -q: nothing but errors


def test_a_factory_with_a_fixed_batch_of_another_size_names_the_batch_to_pass(tmp_path,
                                                                                 monkeypatch):
    from meshscale.models import registry

    (tmp_path / "fixedmod.py").write_text(REGRESSOR + textwrap.dedent('''
        def pair():
            model = make()
            return model, model.example_batch(6)
    '''))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    model, batch_fn = registry.build("fixedmod:pair")
    assert batch_fn(6, 3)["x"].shape == (6, 4)
    with pytest.raises(ValueError, match="a batch of 6 examples, the global batch is 8: "
                                         "pass --batch 6"):
        batch_fn(8, 0)
    model, batch_fn = registry.build("fixedmod:make")  # example_batch(n): no seed= passed
    assert batch_fn(5, 7)["x"].shape == (5, 4)


def test_tables_written_to_a_file_take_a_wide_console(monkeypatch):
    monkeypatch.setattr(sys, "stdout", io.StringIO())  # not a terminal
    monkeypatch.delenv("COLUMNS", raising=False)
    assert terminal.width() == terminal.WIDE == 200 and terminal.console().width == 200
    monkeypatch.setenv("COLUMNS", "150")
    assert terminal.console().width == 150


def test_events_read_as_words_start_up_search_resume_and_polled_device_changes():
    out = io.StringIO()
    console = Console(file=out, width=200)
    on_event = _event_printer(console, {}, check_every=10)
    on_event(events.Resume(time=0.0, step=None, checkpoint_step=40, num_devices=4))
    on_event(events.DevicesChanged(time=0.0, step=90, before=4, after=8, device_ids=[]))
    assert out.getvalue().splitlines() == [
        "resumed from the checkpoint of step 40 on 4 devices",
        "devices changed: 4 -> 8 (seen at step 90; devices are polled every 10 steps)"]
    decision = dataclasses.replace(decide(None, []), ruled_out=tuple(ruled_out(
        4, p_min=2, num_layers=8, global_batch=25)))
    on_event(events.Search(time=0.0, step=None, num_devices=4, decision=decision, seconds=1.0))
    assert "not tried: pipe 1: fewer stages than p_min 2; 2x2: global batch 25 does not " \
           "split into 2 replicas: 2x1 (2 of 4 devices) is tried instead" in out.getvalue()
    assert terminal.search_title({"step": None, "num_devices": 4}) == \
        "start-up search on 4 devices"
    assert terminal.search_title({"step": 90, "num_devices": 1}) == "search at step 90 on 1 device"
