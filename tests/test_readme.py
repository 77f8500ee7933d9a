"""Every snippet of README.md runs as a reader would run it, or is listed with the reason why
it cannot run here and checked as far as it can be.

- ```python blocks are executed as written: in this process (8 simulated CPU devices, as
  the README's first lines tell a reader to set up) or, for the multi-host script, as two
  processes under `meshscale launch`. A loop written to 10_000 steps runs its first few
  (`FirstSteps` stands in for `range` in the snippet's namespace and records the bounds).
- ```bash blocks: each command runs for real when it is cheap; `make` targets that train
  or test for minutes are dry-run (`make -n`) and the meshscale command they would run is
  parsed by the CLI's own parser; the rest are listed in `NOT_RUN` with the reason.
- `SNIPPETS` names every fenced block and the test that runs it: a new block fails
  `test_every_snippet_is_listed_with_the_test_that_runs_it` until it is listed.
"""

import builtins
import contextlib
import io
import os
import pathlib
import re
import shlex
import subprocess
import sys
import textwrap
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import meshscale
from meshscale import MeshShape
from meshscale.app import cli
from meshscale.errors import ResourceError
from meshscale.runtime.launch import launch

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CPU_FLAG = "XLA_FLAGS=--xla_force_host_platform_device_count=8"
LAUNCH_TIMEOUT = 240  # seconds for the multi-host script's two processes, on a loaded machine

pytestmark = pytest.mark.xdist_group("readme")  # one worker: the own-loop run happens once

# Every fenced block of README.md, by a line it holds -> the test that runs it.
CLONE = "git clone <this repo> meshscale"
OWN_LOOP = "print_history(elastic)"
OWN_MODEL = "class Regressor(meshscale.LayerStack):"
ADAPTER = "class Adapted(meshscale.LayerStack):"
MULTI_HOST = "distributed.initialize()                      # first"
RAY = "trainer = meshscale_ray.jax_trainer("
WRITER = "class PrintWriter:"
DATA = "batches = Batches(records(path), 24, seed=0)"
SNIPPETS = {
    "make test   # builds .venv": "test_first_block_make_targets_exist_and_run_the_demo_command",
    CLONE: "test_clone_to_picture_block_runs_its_report_command",
    OWN_LOOP: "test_own_loop_block_trains_saves_and_resumes_from_its_checkpoint",
    OWN_MODEL: "test_own_model_block_trains_on_a_pipelined_mesh_and_matches_its_loss",
    ADAPTER: "test_adapter_block_fits_in_30_lines_and_is_exact",
    MULTI_HOST: "test_multi_host_block_runs_as_two_processes_under_launch",
    RAY: "test_ray_block_builds_the_elastic_jax_trainer",
    WRITER: "test_writer_block_receives_the_loops_scalars_and_texts",
    DATA: "test_data_block_trains_from_batches_keyed_by_step",
}

# What cannot run here, and what the test checks instead.
NOT_RUN = {
    CLONE: "a placeholder URL and the network; the test runs in "
                                       "this checkout",
    "cd meshscale": "the directory of the clone above",
    "make demo": "trains for minutes: `make -n demo` must succeed and its meshscale command "
                 "must parse (tests/test_demo.py runs the demo itself)",
    "make test": "is the whole suite: `make -n test` must succeed",
    "trainer.fit()": "needs a Ray cluster of 8-GPU nodes: the JaxTrainer it would fit is "
                     "checked instead (tests/test_ray.py runs the same glue on a local CPU "
                     "Ray cluster)",
}
RUN_FOR_REAL = {"meshscale report runs/demo"}  # cheap meshscale commands, run in a run dir


def readme() -> str:
    return README.read_text()


def fenced_blocks() -> list[tuple[str, str]]:
    """(language, text) of every fenced block, in order."""
    return re.findall(r"^```(\w*)\n(.*?)^```", readme(), flags=re.S | re.M)


def block(key: str) -> str:
    (text,) = [text for _, text in fenced_blocks() if key in text]
    return text


def bash_commands(text: str) -> list[str]:
    """The commands of a bash block as written: comments dropped, `a && b` split."""
    return [" ".join(command.split()) for line in text.splitlines()
            for command in line.split("#")[0].split("&&") if command.strip()]


class FirstSteps:
    """`range` for a README loop written to 10_000 steps (any loop to 1000 or more): the
    loop as written runs its first `steps` steps; `calls` records the bounds asked for."""

    def __init__(self, steps: int):
        self.steps, self.calls = steps, []

    def __call__(self, *bounds):
        if len(bounds) == 2 and bounds[1] >= 1000:
            self.calls.append(bounds)
            return builtins.range(bounds[0], min(bounds[1], bounds[0] + self.steps))
        return builtins.range(*bounds)


def run_block(text: str, scope: dict) -> dict:
    exec(compile(text, "README.md", "exec"), scope)  # noqa: S102 - our own README
    return scope


def dry_run_make(target: str) -> list[str]:
    """`make -n TARGET` in the repository: the target exists and its recipe expands; the
    meshscale commands it would run parse with the CLI's parser. Returns its lines."""
    done = subprocess.run(["make", "-n", target], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, f"make -n {target}: {done.stderr}"
    lines = done.stdout.splitlines()
    for line in lines:
        words = shlex.split(line, comments=True)
        if words and words[0].endswith("bin/meshscale"):
            cli.build_parser().parse_args(words[1:])
    return lines


def check_meshscale_command(command: str) -> None:
    """Parses with the CLI's parser; its subcommand's --help exits 0."""
    words = shlex.split(command)
    assert words[0] in ("meshscale", ".venv/bin/meshscale"), command
    assert callable(cli.build_parser().parse_args(words[1:]).run)  # a subcommand parsed
    with pytest.raises(SystemExit) as done, contextlib.redirect_stdout(io.StringIO()):
        cli.build_parser().parse_args([words[1], "--help"])
    assert done.value.code == 0


# -- the listing --------------------------------------------------------------------------
def test_every_snippet_is_listed_with_the_test_that_runs_it():
    blocks = fenced_blocks()
    for language, text in blocks:
        assert language in ("python", "bash"), f"a ```{language} block: add how it runs"
        keys = [key for key in SNIPPETS if key in text]
        assert len(keys) == 1, "a README block no test runs (add it to SNIPPETS, and " \
                               f"NOT_RUN what cannot run here):\n{text[:300]}"
        assert SNIPPETS[keys[0]] in globals(), f"no test {SNIPPETS[keys[0]]}"
    for key in SNIPPETS:
        assert sum(key in text for _, text in blocks) == 1, f"no README block holds {key!r}"
    every_command = [c for lang, text in blocks if lang == "bash" for c in bash_commands(text)]
    for command in every_command:
        assert command in NOT_RUN or command in RUN_FOR_REAL, \
            f"{command!r}: run it in a test (RUN_FOR_REAL) or say in NOT_RUN why not"
    python = "\n".join(text for lang, text in blocks if lang == "python")
    for key in NOT_RUN:
        assert key in every_command or key in python, f"NOT_RUN lists {key!r}: not in README"


# -- running on CPU, and how long the suite takes ----------------------------------------
def test_cpu_line_before_the_first_snippet_gives_8_devices_and_quotes_the_real_error(tmp_path):
    text = readme()
    before_first_block = text[:text.index("```")]
    assert CPU_FLAG in before_first_block and "before jax is imported" in before_first_block
    quoted = re.search(r"`(ResourceError: [^`]*)`", before_first_block).group(1)
    # what a reader without the flag (one CPU device) gets from the first loop's FileSource
    from meshscale.elastic import resources
    with pytest.raises(ResourceError) as refused:
        resources.FileSource(tmp_path / "devices.txt", devices=jax.devices()[:1], default=8)
    assert f"ResourceError: {refused.value}" == quoted
    # the flag as the README spells it gives a fresh interpreter 8 devices
    name, value = CPU_FLAG.split("=", 1)
    env = {**os.environ, name: value, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", "import jax; print(jax.device_count())"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["8"], done.stderr


def test_readme_gives_the_time_make_test_takes():
    first = fenced_blocks()[0][1]
    assert re.search(r"^make test .*\d+-\d+ minutes on 2 cores$", first, flags=re.M)
    testing = readme().split("## Testing", 1)[1]
    assert re.search(r"`make test`.*?about \d+-\d+ minutes on 2 CPU cores", testing, re.S)


# -- bash blocks -------------------------------------------------------------------------
def test_first_block_make_targets_exist_and_run_the_demo_command():
    text = fenced_blocks()[0][1]
    commands = bash_commands(text)
    assert commands == ["make demo", "make test"]  # the two commands come first
    assert any("bin/meshscale demo" in line for line in dry_run_make("demo"))
    assert any("pytest" in line for line in dry_run_make("test"))


@pytest.fixture(scope="module")
def own_loop(tmp_path_factory):
    """The 'Using it in your own loop' block, run as written in a fresh directory: first
    from scratch, then again (it resumes from the checkpoint the first run's `with` saved).
    `runs/my_run/devices.txt` says 2 devices, as the scheduler the block names would."""
    work = tmp_path_factory.mktemp("own_loop")
    text = block(OWN_LOOP)
    runs, printed = [], []
    cwd = os.getcwd()
    os.chdir(work)
    try:
        os.makedirs("runs/my_run")
        pathlib.Path("runs/my_run/devices.txt").write_text("2")
        for first_steps in (4, 1):
            steps, out = FirstSteps(first_steps), io.StringIO()
            with contextlib.redirect_stdout(out):
                scope = run_block(text, {"range": steps})
            runs.append((scope, steps.calls))
            printed.append(out.getvalue())
    finally:
        os.chdir(cwd)
    return work, runs, printed


def test_own_loop_block_trains_saves_and_resumes_from_its_checkpoint(own_loop):
    work, ((first, first_bounds), (second, second_bounds)), (printed, _) = own_loop
    assert first_bounds == [(0, 10_000)]
    assert re.search(r"^0 \d+\.\d+ 2x1\S* ", printed, flags=re.M), printed  # step 0's line
    losses = [record.loss for record in first["elastic"].steps]  # fetched when read
    assert len(losses) == 4 and np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert int(first["state"].step) == 4
    saved = {int(p.name) for p in (work / "runs/my_run").rglob("*") if p.name.isdigit()}
    assert 4 in saved  # `with elastic:` saved the last step
    assert second_bounds == [(4, 10_000)]  # "resumes from the latest checkpoint if any"
    assert int(second["state"].step) == 5


def test_own_loop_block_writes_metrics_and_tensorboard_files(own_loop):
    """The run of the own-loop block leaves metrics.jsonl (every step's loss, in windows)
    and TensorBoard files in its checkpoint directory, as the metrics section says."""
    from meshscale.observe.writers import read_jsonl

    work, ((first, _), (second, _)), _ = own_loop
    lines = read_jsonl(work / "runs/my_run/metrics.jsonl")
    windows = [x for x in lines if x["kind"] == "window"]
    steps = [s for w in windows for s in range(w["first_step"], w["step"] + 1)]
    assert steps == [1, 2, 3, 4, 5]  # 4 steps, then the resumed run's fifth
    losses = [x for w in windows for x in w["losses"]]
    assert losses[:4] == pytest.approx([r.loss for r in first["elastic"].steps])
    assert [x["kind"] for x in lines].count("close") == 2
    assert list((work / "runs/my_run/tensorboard").glob("events.out.tfevents.*"))
    goodput = second["elastic"].totals.goodput
    assert 0 < goodput["goodput"] < 1 and goodput["seconds"]["startup"] > 0


def test_writer_block_receives_the_loops_scalars_and_texts(capsys):
    from meshscale.observe.writers import MetricsLog

    scope = run_block(block(WRITER), {"meshscale": meshscale})
    log = MetricsLog(None, scope["metrics"].writers)  # what the loop feeds its writers
    log.record({}, {7: {"loss": 2.5}}, {7: {"mesh": "2x2/m4"}})
    log.close()
    assert capsys.readouterr().out.splitlines() == ["7 {'loss': 2.5}", "7 {'mesh': '2x2/m4'}"]


def test_data_block_trains_from_batches_keyed_by_step(tmp_path, monkeypatch):
    """The meshscale.data block as written (first 3 steps): the trainer read batches 0-2
    itself (the step's rows), and prefetched the next ones."""
    monkeypatch.chdir(tmp_path)
    scope = run_block(block(DATA), {"range": FirstSteps(3)})
    elastic, batches = scope["elastic"], scope["batches"]
    assert int(scope["state"].step) == 3 and len(elastic.steps) == 3
    assert all(np.isfinite(r.loss) for r in elastic.steps)
    assert batches.examples_read >= 3 * 24 and batches.queued == []  # closed: none queued


def test_clone_to_picture_block_runs_its_report_command(own_loop, monkeypatch):
    """`make demo` dry-runs; `meshscale report runs/demo` runs for real on the report.json
    of a real run (the own-loop block's, written as the demo writes its own)."""
    from meshscale.app import report

    work, ((scope, _), _), _ = own_loop
    run_dir = work / "runs" / "demo"
    run_dir.mkdir(parents=True)
    report.write_json(report.run_data(scope["elastic"]), str(run_dir / "report.json"))
    monkeypatch.chdir(work)
    ran = []
    for command in bash_commands(block(CLONE)):
        words = shlex.split(command)
        if command in RUN_FOR_REAL:
            check_meshscale_command(command)
            with contextlib.redirect_stdout(io.StringIO()):
                assert cli.main(words[1:]) == 0
            ran.append(command)
        elif words[0] == "make":
            dry_run_make(words[1])
        else:
            assert command in NOT_RUN
    assert ran == ["meshscale report runs/demo"]
    assert (run_dir / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_inline_commands_in_the_text_parse():
    """Commands quoted in the prose: meshscale ones parse (each `a|b` choice), make
    targets dry-run, the benchmark script named exists."""
    prose = re.sub(r"^```.*?^```", "", readme(), flags=re.S | re.M)
    quoted = [" ".join(q.split()) for q in re.findall(r"`([^`]+)`", prose)]
    meshscale_commands = [q for q in quoted if re.match(r"(\.venv/bin/)?meshscale [a-z]", q)]
    assert len(meshscale_commands) >= 3
    for command in meshscale_commands:
        choices = [re.sub(r"\S+\|\S+", lambda m, c=c: m.group().split("|")[c], command)
                   for c in range(2)] if "|" in command else [command]
        for one in choices:
            check_meshscale_command(one)
    for target in {q.split()[1] for q in quoted if re.fullmatch(r"make [a-z]+", q)}:
        dry_run_make(target)
    for q in quoted:
        if q.startswith(".venv/bin/python -m benchmarks."):
            module, *scripts = q.split()[2:]
            assert (ROOT / (module.replace(".", "/") + ".py")).is_file(), q
            assert all((ROOT / "benchmarks" / s).is_file() for s in scripts), q


# -- python blocks -----------------------------------------------------------------------
def test_own_model_block_trains_on_a_pipelined_mesh_and_matches_its_loss():
    text = block(OWN_MODEL)
    assert len(text.strip().splitlines()) <= 32
    scope = run_block(text, {})
    model, trainer = scope["model"], scope["trainer"]
    batch = {"x": np.linspace(-1, 1, 32 * 4, dtype=np.float32).reshape(32, 4),
             "y": np.ones((32, 1), np.float32)}
    assert jax.tree.map(np.shape, model.example_batch(32)) == jax.tree.map(np.shape, batch)
    shape = MeshShape(2, 2, 2)
    expected = float(model.loss(batch))
    state = trainer.init_state(shape)
    state, metrics = trainer.compile_step(shape)(state, trainer.put_batch(batch, shape))
    np.testing.assert_allclose(float(metrics["loss"]), expected, rtol=1e-5)
    assert int(state.step) == 1 and jax.tree.leaves(state.params)


class TheirConfig:
    vocab, width, num_layers = 64, 16, 4


class TheirBlock(nnx.Module):
    """A stand-in for a third-party block with its own call signature."""

    def __init__(self, cfg, *, rngs):
        self.lin = nnx.Linear(cfg.width, cfg.width, rngs=rngs)

    def __call__(self, x, positions, mask):
        return x + jnp.tanh(self.lin(x)) * mask[..., None] + 0.01 * positions[..., None]


def test_adapter_block_fits_in_30_lines_and_is_exact(monkeypatch):
    """`their_lm` is the reader's own package: a stand-in module provides it."""
    text = block(ADAPTER)
    assert len(text.strip().splitlines()) <= 32  # 30 lines of adapter + the two imports
    monkeypatch.setitem(sys.modules, "their_lm", types.SimpleNamespace(
        Block=TheirBlock, Config=TheirConfig))
    trainer = run_block(text, {})["trainer"]
    rng = np.random.default_rng(0)
    mask = (rng.random((32, 65)) < 0.8).astype(np.int32)
    batch = {"tokens": rng.integers(0, 64, (32, 65)).astype(np.int32), "mask": mask}
    shape = MeshShape(2, 2, 2)
    state = trainer.init_state(shape)
    expected = float(trainer.fmodel.loss(jax.device_get(state.params), batch))
    state, metrics = trainer.compile_step(shape)(state, trainer.put_batch(batch, shape))
    np.testing.assert_allclose(float(metrics["loss"]), expected, rtol=1e-5)


def test_multi_host_block_runs_as_two_processes_under_launch(tmp_path):
    """The script every host runs, as `train.py RUN_DIR` under `meshscale launch`: two
    processes with one simulated device each (one job of two devices); its first 3 steps.
    Without `close()` the last step is saved at exit (the README's 'Nothing is lost')."""
    (tmp_path / "train.py").write_text(block(MULTI_HOST))
    (tmp_path / "first_steps.py").write_text(textwrap.dedent("""\
        import builtins, sys
        bounds = []
        def first_steps(*args):
            if len(args) == 2 and args[1] >= 1000:
                bounds.append(args)
                return builtins.range(args[0], min(args[1], args[0] + 3))
            return builtins.range(*args)
        script = sys.argv.pop(1)
        exec(compile(open(script).read(), script, "exec"),
             {"__name__": "__main__", "range": first_steps})
        print("bounds", bounds)
    """))
    lines = []
    status = launch(["first_steps.py", "train.py", "runs/multi"], processes=2,
                    devices_per_process=1, timeout=LAUNCH_TIMEOUT, output=lines.append,
                    cwd=str(tmp_path))
    text = "\n".join(line for line in lines if "Gloo" not in line)
    assert status == 0, text[-6000:]
    assert "[p0] bounds [(0, 10000)]" in lines and "[p1] bounds [(0, 10000)]" in lines, text
    printed = [line for line in lines if re.match(r"\[p\d\] 0 \d", line)]
    assert len(printed) == 1 and re.match(r"\[p0\] 0 \d+\.\d+ 2x1", printed[0]), text
    saved = {int(p.name) for p in (tmp_path / "runs/multi").rglob("*") if p.name.isdigit()}
    assert 3 in saved, text


def test_ray_block_builds_the_elastic_jax_trainer(monkeypatch):
    """The block runs as written up to `trainer.fit()`, which here records the JaxTrainer
    it was called on (see NOT_RUN): elastic 1-4 workers of 8 GPUs, 3 restarts, the
    reader's `loop` as every worker's function, Ray's records in the shared directory."""
    from ray.train.v2.jax import JaxTrainer  # the ray extra is in the dev set

    fitted = []
    monkeypatch.setattr(JaxTrainer, "fit", lambda self: fitted.append(self) or "result")
    text = block(RAY)
    assert text.rstrip().endswith("result = trainer.fit()")
    scope = run_block(text, {})
    assert fitted == [scope["trainer"]] and scope["result"] == "result"
    trainer = fitted[0]
    assert trainer.train_loop_per_worker.__wrapped__ is scope["loop"]
    scaling = trainer.scaling_config
    assert (scaling.num_workers, scaling.use_gpu, scaling.resources_per_worker) == \
        ((1, 4), True, {"GPU": 8})
    assert trainer.run_config.failure_config.max_failures == 3
    assert trainer.run_config.storage_path == "/shared/run1"
