"""meshscale.data: global batch i depends only on i, on every mesh and process count.

Single-process tests read an ArrayRecord file of the stdlib's text (written here, no
download); the multi-process ones (`meshscale launch`) train through the same file on 2
processes, switch meshes, then resume on 4 processes, against one uninterrupted run.
"""

import json
import pathlib
import shutil

import grain
import jax
import numpy as np
import pytest
from flax import nnx
from meshscale.models.llama import Llama, LlamaConfig
from meshscale.models.text import records

from meshscale import MeshShape, Trainer
from meshscale.data import Batches, pack_documents
from meshscale.errors import InvalidArgument, InvalidBatch
from meshscale.model.contract import layer_inputs, run_layers
from meshscale.runtime.launch import launch
from tests import data_worker as worker
from tests.helpers import make_optimizer

LENGTH = worker.LENGTH
ROOT_DIR = str(pathlib.Path(__file__).resolve().parents[1])


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    return worker.write_text(tmp_path_factory.mktemp("text") / "text.array_record")


def tokens(batch) -> np.ndarray:
    return np.asarray(batch["tokens"])


def test_batch_i_is_the_same_for_any_rows_prefetch_and_call_order(text_file):
    with Batches(records(text_file), 24, seed=7, prefetch=2) as ahead, \
            Batches(records(text_file), 24, seed=7, prefetch=0) as plain:
        for step in reversed(range(13)):  # across the first epoch's end (10 steps)
            full = tokens(ahead.batch(step))
            for parts in (2, 4):  # a process's rows, read in any order
                cuts = [slice(i * 24 // parts, (i + 1) * 24 // parts) for i in range(parts)]
                rows = [tokens(plain.rows(step, cut)) for cut in reversed(cuts)]
                np.testing.assert_array_equal(np.concatenate(rows[::-1]), full)
        # each epoch is a permutation of the file; the next epoch another one
        every = sorted(map(tuple, tokens(records(text_file).batch(worker.RECORDS)[0])))
        first = np.concatenate([tokens(plain.batch(i)) for i in range(10)])
        second = np.concatenate([tokens(plain.batch(i)) for i in range(10, 20)])
        assert sorted(map(tuple, first)) == every == sorted(map(tuple, second))
        assert not np.array_equal(first, second)
        # a mesh change re-targets the prefetch: the old rows' reads are dropped
        ahead.rows(20, slice(0, 12))
        assert ahead.queued == [(21, 0, 12), (22, 0, 12)]
        ahead.rows(21, slice(12, 24))
        assert ahead.queued == [(22, 12, 24), (23, 12, 24)]


def test_shuffling_is_reproducible_from_the_seed(text_file):
    same = [Batches(records(text_file), 24, seed=7, prefetch=0) for _ in range(2)]
    other = Batches(records(text_file), 24, seed=8, prefetch=0)
    ordered = Batches(records(text_file), 24, shuffle=False, prefetch=0)
    np.testing.assert_array_equal(tokens(same[0].batch(3)), tokens(same[1].batch(3)))
    assert not np.array_equal(tokens(same[0].batch(3)), tokens(other.batch(3)))
    np.testing.assert_array_equal(tokens(ordered.batch(1)),
                                  tokens(records(text_file)[24:48].batch(24)[0]))


def test_a_process_reads_only_the_rows_it_asks_for(text_file):
    data, counted = worker.batches(text_file, prefetch=0)
    data.rows(5, slice(6, 12))
    assert counted.bytes == 6 * LENGTH and data.examples_read == 6


def bad(make) -> str:
    with pytest.raises((InvalidArgument, InvalidBatch)) as e:
        make()
    assert "\n" not in str(e.value)
    return str(e.value)


def test_a_bad_source_is_refused_with_one_line(text_file):
    assert "not random access" in bad(lambda: Batches(
        grain.MapDataset.range(100).to_iter_dataset(), 24))
    assert "not random access" in bad(lambda: Batches(iter(range(100)), 24))
    assert "fewer than one global batch" in bad(lambda: Batches(records(text_file)[:20], 24))
    spec = {"tokens": jax.ShapeDtypeStruct((24, LENGTH), np.int32)}  # the GPTs' batch
    renamed = records(text_file).map(lambda x: {"text": x["tokens"]})
    assert "['text']" in bad(lambda: Batches(renamed, 24).check(spec))
    narrow = records(text_file).map(lambda x: {"tokens": x["tokens"].astype(np.uint8)})
    assert "uint8" in bad(lambda: Batches(narrow, 24).check(spec))
    assert Batches(records(text_file), 24).check(spec) is None


CFG = LlamaConfig(vocab=256, seq_len=11, num_layers=2, d_model=32, num_heads=4,
                  num_kv_heads=2, mlp_hidden=64)


def test_packed_rows_match_a_hand_built_packed_batch_and_feed_llama():
    docs = [np.arange(1, 4), np.arange(10, 15), np.arange(20, 24), np.arange(30, 32)]
    dataset = grain.MapDataset.source([{"tokens": d} for d in docs])
    packed = pack_documents(dataset, 12, documents_per_row=3, positions=True)
    assert len(packed) == 2
    want_tokens = [[1, 2, 3, 10, 11, 12, 13, 14, 20, 21, 22, 23],
                   [30, 31, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]]
    want_segments = [[1, 1, 1, 2, 2, 2, 2, 2, 3, 3, 3, 3], [1, 1] + [0] * 10]
    want_positions = [[0, 1, 2, 0, 1, 2, 3, 4, 0, 1, 2, 3], [0, 1] + [0] * 10]
    rows = Batches(packed, 2, shuffle=False, prefetch=0).batch(0)
    np.testing.assert_array_equal(rows["tokens"], want_tokens)
    np.testing.assert_array_equal(rows["segments"], want_segments)
    np.testing.assert_array_equal(rows["positions"], want_positions)
    # Llama's loss over the packed row = the sum over its documents trained alone
    model = Llama(CFG, rngs=nnx.Rngs(0))

    @jax.jit
    def loss_sum(batch):
        h = run_layers(model.blocks, model.embed(batch), layer_inputs(model, batch))
        return model.head_loss(h, batch)

    total, count = loss_sum({k: rows[k][:1] for k in ("tokens", "segments")})
    alone = [loss_sum({"tokens": np.pad(d, (0, 12 - len(d)))[None],
                       "segments": (np.arange(12) < len(d)).astype(np.int32)[None]})
             for d in docs[:3]]
    assert float(count) == sum(float(c) for _, c in alone) == 2 + 4 + 3
    np.testing.assert_allclose(float(total), sum(float(t) for t, _ in alone), rtol=1e-5)


# -- several processes ----------------------------------------------------------------
def run_job(mode, out, run, *, processes, devices_per_process, cache_dir):
    lines = []
    env = {"JAX_COMPILATION_CACHE_DIR": str(cache_dir),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    ended = launch(["-m", "tests.data_worker", mode, str(out), str(run)], processes=processes,
                   devices_per_process=devices_per_process, timeout=240,
                   output=lines.append, cwd=ROOT_DIR, env=env)
    text = "\n".join(line for line in lines if "[Gloo]" not in line)
    assert ended == 0, f"{mode} on {processes}x{devices_per_process} exited {ended}:\n" \
                       f"{text[-6000:]}"
    return [json.loads((out / f"{run.name}-{p}.json").read_text()) for p in range(processes)]


def uninterrupted(text_file):
    """Losses and global batches of one process on a fixed 2x4 mesh, read through the
    pipeline (`Batches.placed`) for every step of the jobs."""
    shape = MeshShape(2, 4, 2)
    trainer = Trainer(worker.model(), make_optimizer(), global_batch=worker.BATCH)
    state, step, losses, batches = trainer.init_state(shape), trainer.compile_step(shape), [], []
    with Batches(records(text_file), worker.BATCH, seed=worker.SEED) as data:
        for i in range(worker.END):
            state, metrics = step(state, data.placed(i, trainer, shape))
            losses.append(float(metrics["loss"]))
            batches.append(tokens(data.batch(i)))
    return losses, batches


@pytest.mark.xdist_group("multihost")
def test_switch_and_restart_on_another_process_count_read_the_same_samples(
        tmp_path_factory):
    """2 processes x 4 devices train steps 0-6 through the pipeline, going from 2x4 to 6
    devices at step 3; 4 processes x 2 devices, and this one process, resume at step 6.
    Every step's rows are the uninterrupted run's, its losses equal, and a process reads
    only its rows."""
    out = tmp_path_factory.mktemp("data_jobs")
    shutil.copy(worker.write_text(out / "made.array_record"), out / "text.array_record")
    cache = out / "jax_cache"
    first = run_job("train", out, out / "train", processes=2, devices_per_process=4,
                    cache_dir=cache)
    shutil.copytree(out / "train", out / "resume")
    second = run_job("resume", out, out / "resume", processes=4, devices_per_process=2,
                     cache_dir=cache)
    shutil.copytree(out / "train", out / "alone")  # and resumed by this one process
    worker.train(out, out / "alone", (worker.SAVED, worker.END))
    third = [json.loads((out / "alone-0.json").read_text())]
    losses, batches = uninterrupted(out / "text.array_record")
    resumed = (worker.SAVED, worker.END)
    for job, (start, end) in ((first, (0, worker.SAVED)), (second, resumed), (third, resumed)):
        assert [r["first"] for r in job] == [start] * len(job)
        for result in job:
            np.testing.assert_allclose(result["losses"], losses[start:end], rtol=1e-5)
        for step in range(start, end):  # the processes' rows make up the global batch
            got = np.zeros_like(batches[step])
            for result in job:
                for s, lo, hi, rows in result["reads"]:
                    np.testing.assert_array_equal(rows, batches[s][lo:hi])  # every read
                    if s == step:
                        got[lo:hi] = rows
            np.testing.assert_array_equal(got, batches[step])
    # rows per mesh: halves on 2x4; after the change process 1 holds one pipeline column
    assert [r["rows"]["2x4/m2"] for r in first] == [[0, 12], [12, 24]]
    assert [r["rows"][first[0]["mesh"]] for r in first] == [[0, 16], [16, 24]]
    assert [r["rows"]["2x4/m2"] for r in second] == [[0, 6], [6, 12], [12, 18], [18, 24]]
    # the searches' try-runs were measured (injected): no process ever read other rows
    for job in (first, second, third):
        for result in job:
            assert {(lo, hi) for _, lo, hi, _ in result["reads"]} == \
                {tuple(rows) for rows in result["rows"].values()}
    # bytes read per steady step: this process's share of the global batch's records
    for job in (first, second, third):
        for result in job:
            rows = result["rows"]["2x4/m2"]
            assert result["bytes_per_step"] == (rows[1] - rows[0]) * LENGTH
            assert result["bytes_per_step"] == worker.BATCH * LENGTH / len(job)
