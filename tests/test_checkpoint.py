"""Checkpoints: exact restore onto any mesh, refusal of foreign checkpoints, damage recovery.

No train step is compiled here: states are random values placed with `Trainer` shardings.
"""

import glob
import json
import logging
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P
from meshscale.models.mlp import MLPConfig, ResidualMLP

from meshscale import Checkpointer, IncompatibleCheckpoint, MeshShape, Trainer, TrainState
from meshscale.store.state_tree import state_to_tree, tree_to_state
from tests.helpers import random_host_state

# A failed Orbax read (the damage tests) leaves tensorstore callbacks aimed at the closed
# event loop of that read; Python reports them later, in whichever test is running.
pytestmark = pytest.mark.filterwarnings(
    "ignore:(?s)Exception ignored in.*Event loop is closed:pytest.PytestUnraisableExceptionWarning")

SMALL = MLPConfig(num_layers=8, features=8, hidden=16, inputs=4, outputs=2)
SHAPES = [MeshShape(1, 1), MeshShape(2, 1), MeshShape(1, 8), MeshShape(2, 4), MeshShape(4, 2),
          MeshShape(8, 1)]


def make_trainer(cfg=SMALL, optimizer=None, global_batch=8):
    model = ResidualMLP(cfg, rngs=nnx.Rngs(0))
    return Trainer(model, optimizer or optax.adam(1e-3), global_batch=global_batch)


@pytest.fixture(scope="module")
def trainer():
    return make_trainer()


def random_state(trainer, shape, seed):
    """A random state (`random_host_state`) placed on `shape`'s mesh."""
    return jax.device_put(random_host_state(trainer, shape, seed), trainer.shardings(shape))


def layers_only(trainer, state):
    """`state` on the host without the stack's padding rows: comparable across meshes."""
    return trainer.unpadded_state(jax.device_get(state))


def assert_same_values(actual, expected):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(actual)[0],
                            jax.tree.leaves(expected), strict=True):
        assert a.dtype == b.dtype, jax.tree_util.keystr(path)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b),
                                      err_msg=jax.tree_util.keystr(path))


def assert_on_shardings(state, shardings):
    for leaf, sharding in zip(jax.tree.leaves(state), jax.tree.leaves(shardings), strict=True):
        assert isinstance(leaf.sharding, NamedSharding)
        assert leaf.sharding == sharding


def listing(directory):
    """Every file and folder under `directory` with its size and modification time."""
    out = {}
    for root, dirs, files in os.walk(directory):
        for name in dirs + files:
            path = os.path.join(root, name)
            st = os.stat(path)
            out[os.path.relpath(path, directory)] = (st.st_size, st.st_mtime_ns)
    return out


def test_dict_conversion_round_trips_optax_namedtuples_exactly(trainer):
    state = trainer.abstract_state()
    tree = state_to_tree(state)
    assert set(tree) == {"step", "params", "opt_state"}
    assert set(tree["opt_state"]["0"]) == {"count", "mu", "nu"}  # ScaleByAdamState fields
    back = tree_to_state(tree, state)
    assert jax.tree.structure(back) == jax.tree.structure(state)
    assert all(a is b for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(state), strict=True))


def test_restore_from_2x4_onto_4x2_and_1x1_is_bit_identical_on_target_shardings(
        trainer, tmp_path):
    state = random_state(trainer, MeshShape(2, 4), seed=1)
    with Checkpointer(tmp_path, trainer) as ckpt:
        assert ckpt.save(state, shape=MeshShape(2, 4))
        for target in (MeshShape(4, 2), MeshShape(1, 1)):
            restored = ckpt.restore(target)
            assert_same_values(restored, state)
            assert_on_shardings(restored, trainer.shardings(target))
            assert restored.step.sharding.spec == P()  # the step counter is replicated too
        assert ckpt.last_fallback is None


def test_a_checkpoint_restores_onto_every_state_sharding_mode(tmp_path):
    """Saved with replicated state on 2x4; read back split over data (ZeRO-1, FSDP) on
    other meshes, and vice versa: the files are plain layer-major Orbax trees."""
    modes = {m: Trainer(ResidualMLP(SMALL, rngs=nnx.Rngs(0)), optax.adam(1e-3),
                        global_batch=8, state_sharding=m) for m in ("replicate", "zero1", "fsdp")}
    for saver, shape in (("replicate", MeshShape(2, 4)), ("fsdp", MeshShape(1, 8))):
        state = random_state(modes[saver], shape, seed=3)
        with Checkpointer(tmp_path / saver, modes[saver]) as ckpt:
            assert ckpt.save(state, shape=shape)
        for trainer in modes.values():
            with Checkpointer(tmp_path / saver, trainer) as ckpt:
                for target in (MeshShape(4, 2), MeshShape(2, 4)):
                    restored = ckpt.restore(target)
                    assert_same_values(restored, state)
                    assert_on_shardings(restored, trainer.shardings(target))


def test_every_pair_of_mesh_shapes_restores_bit_identically(trainer, tmp_path):
    states = {}
    with Checkpointer(tmp_path, trainer, max_to_keep=len(SHAPES)) as ckpt:
        for i, shape in enumerate(SHAPES):
            states[i] = random_state(trainer, shape, seed=10 + i)
            ckpt.save(states[i], shape=shape, step=i)
        assert ckpt.all_steps() == list(range(len(SHAPES)))
        for i, source in enumerate(SHAPES):
            assert ckpt.metadata(i)["mesh_shape"] == str(source)
            for target in SHAPES:
                restored = ckpt.restore(target, step=i)
                assert_same_values(restored, states[i])
                assert_on_shardings(restored, trainer.shardings(target))


# Uneven GPipe stages (8 layers on 3 and 5 stages: the stack is stored padded to 9 and 10
# rows) and circular schedules (4 and 6 groups: 8 and 12 rows), and 2x4 (8 rows: the
# unpadded layer-major stack every earlier meshscale wrote).
PADDED = [MeshShape(3, 2), MeshShape(5, 1), MeshShape(2, 2, 2, repeats=2),
          MeshShape(3, 1, 4, repeats=2), MeshShape(2, 4)]


def test_stacks_saved_on_any_split_restore_onto_any_other(trainer, tmp_path):
    assert [trainer.rows(s) for s in PADDED] == [9, 10, 8, 12, 8]
    states = {}
    with Checkpointer(tmp_path, trainer, max_to_keep=len(PADDED)) as ckpt:
        for i, shape in enumerate(PADDED):
            states[i] = random_state(trainer, shape, seed=20 + i)
            ckpt.save(states[i], shape=shape, step=i)
            assert ckpt.metadata(i)["block_rows"] == trainer.rows(shape)
            assert ckpt.metadata(i)["param_count"] == sum(
                np.size(x) for x in jax.tree.leaves(trainer.abstract_state().params))
        for i, source in enumerate(PADDED):
            for target in PADDED:
                restored = ckpt.restore(target, step=i)
                assert_on_shardings(restored, trainer.shardings(target))
                assert_same_values(layers_only(trainer, restored), layers_only(trainer, states[i]))
                padding = [np.asarray(x)[SMALL.num_layers:] for x in
                           jax.tree.leaves(restored.params["blocks"])]
                assert all(not p.any() for p in padding), f"{source} -> {target}"


# 6 layers on a circular 2-stage mesh (4 groups of 2 rows) are stored as 8 rows, where a
# GPipe mesh of the same size holds 6: the stored padding is the saving mesh's schedule.
SIX = MLPConfig(num_layers=6, features=8, hidden=16, inputs=4, outputs=2)
CIRCULAR = MeshShape(2, 4, 2, repeats=2)


@pytest.fixture(scope="module")
def six_layers():
    return make_trainer(SIX)


def test_a_padded_circular_stack_restores_onto_gpipe_and_circular_meshes(six_layers, tmp_path):
    trainer = six_layers
    targets = [MeshShape(2, 4), MeshShape(4, 2), MeshShape(2, 2, 2, repeats=2),
               MeshShape(3, 1, 4, repeats=2), CIRCULAR]
    assert [trainer.rows(s) for s in [CIRCULAR, *targets]] == [8, 6, 8, 8, 6, 8]
    state = random_state(trainer, CIRCULAR, seed=30)
    assert state.params["blocks"]["down"]["bias"].shape == (2, 4, 8)  # [repeats, pipe * slots]
    with Checkpointer(tmp_path, trainer) as ckpt:
        assert ckpt.save(state, shape=CIRCULAR)
        assert ckpt.metadata()["block_rows"] == 8
        ckpt.wait()
        # On disk one layer axis, the layer-major rows plain Orbax reads (format.py's doc).
        import orbax.checkpoint as ocp
        tree = ocp.StandardCheckpointer().metadata(
            tmp_path / str(int(state.step)) / "state").item_metadata.tree
        assert tuple(tree["params"]["blocks"]["down"]["bias"].shape) == (8, 8)
        assert tuple(tree["opt_state"]["0"]["mu"]["blocks"]["down"]["bias"].shape) == (8, 8)
        for target in targets:
            restored = ckpt.restore(target)
            assert_on_shardings(restored, trainer.shardings(target))
            assert_same_values(layers_only(trainer, restored), layers_only(trainer, state))
            padding = [np.asarray(x)[SIX.num_layers:] for x in
                       jax.tree.leaves(restored.params["blocks"])]
            assert all(not p.any() for p in padding), target
        assert_same_values(ckpt.restore(CIRCULAR), state)  # padding rows and all


def test_a_trainstate_of_the_saving_meshs_shardings_gets_the_stored_padding(
        six_layers, tmp_path):
    """Shardings do not say which schedule their mesh runs: onto the mesh a step was
    saved from, its metadata does (the saved `MeshShape`, circular included); onto another
    mesh, the stack is padded for GPipe on that mesh (pass a `MeshShape` if circular)."""
    trainer = six_layers
    state = random_state(trainer, CIRCULAR, seed=31)
    with Checkpointer(tmp_path, trainer) as ckpt:
        assert ckpt.save(state, shape=CIRCULAR)
        restored = ckpt.restore(trainer.shardings(CIRCULAR))
        assert_same_values(restored, state)  # 8 rows, as saved: not GPipe's 6
        assert_on_shardings(restored, trainer.shardings(CIRCULAR))
        gpipe = ckpt.restore(trainer.shardings(MeshShape(2, 2)))
        assert trainer.rows(MeshShape(2, 2)) == 6
        assert_same_values(gpipe, layers_only(trainer, state))
        assert_on_shardings(gpipe, trainer.shardings(MeshShape(2, 2)))


def test_restore_onto_a_trainstate_of_shardings_replicates_a_single_device_step(
        trainer, tmp_path):
    state = random_state(trainer, MeshShape(2, 4), seed=2)
    target = trainer.shardings(MeshShape(8, 1))
    odd = TrainState(SingleDeviceSharding(jax.devices()[0]), target.params, target.opt_state)
    with Checkpointer(tmp_path, trainer) as ckpt:
        ckpt.save(state)
        restored = ckpt.restore(odd)
    assert_same_values(restored, state)
    assert_on_shardings(restored, target)


def test_metadata_records_model_mesh_batch_and_param_count(trainer, tmp_path):
    state = random_state(trainer, MeshShape(2, 4), seed=3)
    with Checkpointer(tmp_path, trainer) as ckpt:
        ckpt.save(state)
        meta = ckpt.metadata()
    assert meta["model_fingerprint"] == trainer.fingerprint
    assert meta["mesh_shape"] == "2x4"  # derived from the state's mesh
    assert meta["global_batch"] == 8
    assert meta["step"] == int(state.step)
    assert meta["param_count"] == sum(np.size(x) for x in jax.tree.leaves(state.params))
    assert meta["meshscale_version"]


@pytest.mark.parametrize("other", [
    pytest.param(lambda: make_trainer(MLPConfig(num_layers=8, features=8, hidden=32,
                                                inputs=4, outputs=2)), id="model"),
    pytest.param(lambda: make_trainer(optimizer=optax.sgd(0.1, momentum=0.9)), id="optimizer"),
    pytest.param(lambda: make_trainer(global_batch=16), id="global_batch"),
])
def test_foreign_checkpoint_raises_and_leaves_directory_unchanged(trainer, tmp_path, other):
    with Checkpointer(tmp_path, trainer) as ckpt:
        ckpt.save(random_state(trainer, MeshShape(2, 4), seed=4))
    before = listing(tmp_path)
    foreign = other()
    with Checkpointer(tmp_path, foreign) as ckpt:
        with pytest.raises(IncompatibleCheckpoint, match="point checkpoint_dir elsewhere"):
            ckpt.restore(MeshShape(2, 4))
        with pytest.raises(IncompatibleCheckpoint):  # nor may it write next to them
            ckpt.save(random_state(foreign, MeshShape(2, 4), seed=5), step=99)
    assert listing(tmp_path) == before


def _array_files(step_dir):
    """The OCDBT data files of a step's state (root and per-process databases)."""
    files = glob.glob(f"{step_dir}/state/**/d/*", recursive=True)
    assert files
    return files


def _delete_array_files(step_dir):
    for f in _array_files(step_dir):
        os.remove(f)


def _truncate_array_files(step_dir):
    files = _array_files(step_dir)
    for f in files:
        os.truncate(f, os.path.getsize(f) // 3)


def _remove_commit_marker(step_dir):
    os.remove(f"{step_dir}/commit_success.txt")


def _garble_metadata(step_dir):
    with open(f"{step_dir}/meshscale/metadata", "w") as f:
        f.write('{"format": "meshscale.tr')


def _save_steps(trainer, directory, *, seeds):
    """Random states (one per seed) saved as steps 1, 2, ...; returned in that order."""
    states = [random_state(trainer, MeshShape(2, 4), seed=s) for s in seeds]
    with Checkpointer(directory, trainer) as ckpt:
        for step, state in enumerate(states, start=1):
            ckpt.save(state, step=step)
    return states


@pytest.mark.parametrize("damage", [_delete_array_files, _truncate_array_files,
                                    _remove_commit_marker, _garble_metadata],
                         ids=["deleted", "truncated", "uncommitted", "garbled_metadata"])
def test_damaged_newest_step_falls_back_to_previous_with_warning(trainer, tmp_path, damage,
                                                                 caplog):
    good, _ = _save_steps(trainer, tmp_path, seeds=(6, 7))
    damage(tmp_path / "2")
    before = listing(tmp_path)
    with Checkpointer(tmp_path, trainer) as ckpt:
        with caplog.at_level(logging.WARNING, logger="meshscale.store.checkpoint"):
            restored = ckpt.restore(MeshShape(4, 2))
        assert_same_values(restored, good)
        assert ckpt.last_fallback is not None
        assert ckpt.last_fallback.restored_step == 1
        assert [s for s, _ in ckpt.last_fallback.skipped] == [2]
        assert any("step 2" in r.getMessage() and "unreadable" in r.getMessage()
                   for r in caplog.records)
        with pytest.raises(IncompatibleCheckpoint, match="step 2 .* is unreadable"):
            ckpt.restore(MeshShape(4, 2), step=2)  # an explicit step never falls back
    assert listing(tmp_path) == before


def test_saving_a_damaged_step_again_sets_the_damaged_one_aside(trainer, tmp_path):
    good, _ = _save_steps(trainer, tmp_path, seeds=(6, 6))
    newer = random_state(trainer, MeshShape(2, 4), seed=7)
    _truncate_array_files(tmp_path / "2")
    with Checkpointer(tmp_path, trainer) as ckpt:
        assert ckpt.save(newer, step=2) is False  # not known to be damaged: kept as is
        assert_same_values(ckpt.restore(MeshShape(4, 2)), good)  # falls back to step 1
        assert ckpt.save(newer, step=2) is True  # now known damaged: replaced
        ckpt.wait()
        assert_same_values(ckpt.restore(MeshShape(4, 2)), newer)
        assert ckpt.last_fallback is None and ckpt.all_steps() == [1, 2]
    assert (tmp_path / "2.damaged" / "state").is_dir()  # kept for inspection


def test_restore_with_no_readable_step_raises(trainer, tmp_path):
    with Checkpointer(tmp_path, trainer) as ckpt:
        with pytest.raises(FileNotFoundError):
            ckpt.restore(MeshShape(2, 4))
        ckpt.save(random_state(trainer, MeshShape(2, 4), seed=8), step=1)
    _delete_array_files(tmp_path / "1")
    with Checkpointer(tmp_path, trainer) as ckpt:
        with pytest.raises(IncompatibleCheckpoint, match="no step .* is readable"):
            ckpt.restore(MeshShape(2, 4))


def test_max_to_keep_keeps_only_the_newest_steps(trainer, tmp_path):
    state = random_state(trainer, MeshShape(2, 4), seed=9)
    with Checkpointer(tmp_path, trainer, max_to_keep=2) as ckpt:
        for step in (1, 2, 3, 4):
            ckpt.save(state, step=step)
        assert ckpt.all_steps() == [3, 4]
        assert ckpt.latest_step() == 4
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ["3", "4"]


def test_saving_an_already_saved_step_writes_nothing(trainer, tmp_path):
    state = random_state(trainer, MeshShape(2, 4), seed=10)
    with Checkpointer(tmp_path, trainer) as ckpt:
        assert ckpt.save(state, step=5)
        ckpt.wait()
        before = listing(tmp_path)
        assert not ckpt.save(random_state(trainer, MeshShape(2, 4), seed=11), step=5)
        assert listing(tmp_path) == before
        assert_same_values(ckpt.restore(MeshShape(2, 4)), state)


def test_async_save_keeps_values_when_the_state_is_donated_right_after(trainer, tmp_path):
    state = random_state(trainer, MeshShape(2, 4), seed=12)
    expected = jax.device_get(state)
    bump = jax.jit(lambda s: jax.tree.map(lambda x: x + 1, s), donate_argnums=0)
    with Checkpointer(tmp_path, trainer, async_save=True) as ckpt:
        ckpt.save(state, step=1)
        bumped = bump(state)  # reuses the saved arrays' buffers while the write runs
        jax.block_until_ready(bumped)
        restored = ckpt.restore(MeshShape(2, 4))  # waits for the write first
    assert_same_values(restored, expected)


PLAIN_ORBAX_READER = textwrap.dedent("""
    import json, sys
    import jax, numpy as np, orbax.checkpoint as ocp
    path, expected = sys.argv[1], np.load(sys.argv[2])
    ckptr = ocp.StandardCheckpointer()
    tree = ckptr.metadata(path).item_metadata.tree
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    state = ckptr.restore(path, jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree))
    flat = {"/".join(str(getattr(k, "key", k)) for k in p): np.asarray(v)
            for p, v in jax.tree_util.tree_flatten_with_path(state)[0]}
    assert sorted(flat) == sorted(expected.files), (sorted(flat), expected.files)
    for name in expected.files:
        assert flat[name].dtype == expected[name].dtype, name
        assert np.array_equal(flat[name], expected[name]), name
    assert not [m for m in sys.modules if m.split(".")[0] in ("meshscale", "models")]
    print(json.dumps({"leaves": len(flat), "devices": len(jax.devices())}))
""")


def test_plain_orbax_reads_a_meshscale_checkpoint_without_importing_meshscale(
        trainer, tmp_path):
    state = random_state(trainer, MeshShape(2, 4), seed=13)
    with Checkpointer(tmp_path / "ckpt", trainer) as ckpt:
        ckpt.save(state, step=3)
    flat = {"/".join(str(getattr(k, "key", k)) for k in p): np.asarray(v)
            for p, v in jax.tree_util.tree_flatten_with_path(state_to_tree(state))[0]}
    np.savez(tmp_path / "expected.npz", **flat)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device: new host
    env["JAX_PLATFORMS"] = "cpu"
    out = subprocess.run(
        [sys.executable, "-c", PLAIN_ORBAX_READER, str(tmp_path / "ckpt" / "3" / "state"),
         str(tmp_path / "expected.npz")],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report == {"leaves": len(flat), "devices": 1}


def test_run_paths_keep_urls_and_make_local_paths_absolute(tmp_path, monkeypatch):
    """`gs://` directories reach Orbax as given (pathlib's absolute() made them
    /cwd/gs:/...); local ones are absolute, so a later chdir cannot move them."""
    from etils import epath

    from meshscale.runtime.paths import run_path

    url = run_path("gs://bucket/runs/a")
    assert isinstance(url, epath.Path) and str(url) == "gs://bucket/runs/a"
    assert str(url / "state") == "gs://bucket/runs/a/state"
    monkeypatch.chdir(tmp_path)
    assert str(run_path("run/state")) == str(tmp_path / "run" / "state")


def test_reading_the_step_list_does_not_wait_for_a_write(trainer, tmp_path, monkeypatch):
    state = random_state(trainer, MeshShape(2, 4), seed=13)
    with Checkpointer(tmp_path / "rel", trainer) as ckpt:
        waits = []
        original = type(ckpt).wait
        monkeypatch.setattr(type(ckpt), "wait", lambda self: waits.append(1) or original(self))
        assert ckpt.save(state, step=1)
        assert ckpt.all_steps() == [1] and waits == []  # the write may still be running
        assert ckpt.latest_step() == 1 and waits == [1]  # on disk: waited for
        assert_same_values(ckpt.restore(MeshShape(2, 4)), state)


TRUNCATED_RESTORE = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    sys.path.insert(0, sys.argv[2])
    from meshscale import Checkpointer, MeshShape
    from tests.test_checkpoint import make_trainer
    state = Checkpointer(sys.argv[1], make_trainer()).restore(MeshShape(4, 2))
    print("restored step", int(state.step))
""")


def test_a_truncated_step_costs_one_warning_line_not_an_orbax_traceback(trainer, tmp_path):
    """What a user's terminal shows when the newest step is truncated: meshscale's one
    warning (Orbax's tracebacks and tensorstore's ignored-coroutine reports are at
    DEBUG), then training goes on from the previous step."""
    _save_steps(trainer, tmp_path, seeds=(6, 7))
    _truncate_array_files(tmp_path / "2")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", TRUNCATED_RESTORE, str(tmp_path), root],
                         capture_output=True, text=True, timeout=180, cwd=root,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "restored step" in out.stdout
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert not any("Traceback" in line or "Exception ignored" in line for line in lines), \
        out.stderr[-3000:]
    assert len(lines) <= 3 and any("unreadable" in line for line in lines), out.stderr


@pytest.mark.parametrize("onto", [MeshShape(2, 4), MeshShape(4, 2)], ids=str)
def test_the_first_step_after_a_restore_donates_the_restored_state(tmp_path, onto):
    """A restored state is an ordinary input of the compiled step: its buffers are reused,
    never kept beside the step's outputs (the second copy reported in jax#18617)."""
    batch = jax.device_get(ResidualMLP(SMALL, rngs=nnx.Rngs(0)).example_batch(8))
    trainer = make_trainer()
    trainer.set_example_batch(batch)
    with Checkpointer(tmp_path, trainer) as ckpt:
        saved = random_state(trainer, MeshShape(2, 4), seed=13)
        ckpt.save(saved)
        restored = ckpt.restore(onto)
    assert not any(x.is_deleted() for x in jax.tree.leaves(restored))
    new, _ = trainer.compile_step(onto)(restored, trainer.put_batch(batch, onto))
    jax.block_until_ready(new)
    assert all(x.is_deleted() for x in jax.tree.leaves(restored))
    assert int(new.step) == int(saved.step) + 1
