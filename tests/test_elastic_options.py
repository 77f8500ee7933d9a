"""ElasticTrainer is built on a Trainer: every Trainer option reaches an elastic run.

The reference is the fixed-mesh `Trainer` with the same options (bf16 compute, dropout
keys): an elastic run that switches meshes mid-run must train the same losses.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from meshscale.models.llama import Llama

from meshscale import (
    CheckpointPolicy,
    ElasticTrainer,
    InvalidArgument,
    MeshShape,
    SearchSpace,
    SwitchPolicy,
    Timing,
    Trainer,
)
from meshscale.elastic import resources
from tests.helpers import prefer_more_devices
from tests.test_contract import BATCH, BF16_TOL, DROPOUT, ragged_batch

STEPS, SWITCH_AT = 6, 3
FIXED = MeshShape(2, 1, 4)  # what the search picks on 2 devices


def make_trainer(**options) -> Trainer:
    model = lambda: Llama(DROPOUT, rngs=nnx.Rngs(0))  # a constructor: built on each mesh
    options = {"compute_dtype": jnp.bfloat16, "rng_seed": 7, **options}
    return Trainer(model, optax.adam(1e-3), global_batch=BATCH, example_batch=ragged_batch(0),
                   **options)


def quiet_policies(**switching):
    return dict(timing=Timing(warmup=0, steps=1),
                switching=SwitchPolicy(precompile="off", **switching),
                checkpoints=CheckpointPolicy(persistent_cache=False))


@functools.cache
def fixed_mesh_losses() -> list[float]:
    trainer = make_trainer()
    state, step = trainer.init_state(FIXED), trainer.compile_step(FIXED)
    losses = []
    for i in range(STEPS):
        state, metrics = step(state, trainer.put_batch(ragged_batch(i), FIXED))
        losses.append(float(metrics["loss"]))
    return losses


def test_bf16_and_dropout_elastic_run_that_switches_meshes_trains_the_fixed_mesh_losses(
        tmp_path, devices):
    granted = {"n": 2}
    measure = functools.partial(prefer_more_devices, global_batch=BATCH)
    elastic = ElasticTrainer(make_trainer(), checkpoint_dir=tmp_path / "run",
                             resources=resources.Callback(lambda: devices[: granted["n"]]),
                             space=SearchSpace(p_min=2),
                             **quiet_policies(check_every=SWITCH_AT, measure=measure))
    with elastic:
        state = elastic.init(ragged_batch(0))
        assert elastic.shape == FIXED
        losses = []
        for i in range(STEPS):
            if i == SWITCH_AT - 1:
                granted["n"] = 8  # seen at the check after step SWITCH_AT
            state, metrics = elastic.step(state, ragged_batch(i))
            losses.append(float(metrics["loss"]))
        switches = [e for e in elastic.history if e["event"] == "switch"]
    assert [e["reason"] for e in switches] == ["start", "faster"]
    assert switches[-1]["num_devices"] == 8 and elastic.shape.num_devices == 8
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))  # master weights
    np.testing.assert_allclose(losses, fixed_mesh_losses(), rtol=BF16_TOL)
    # dropout is on (keys reach every layer): a run without keys trains other losses
    assert not np.isclose(losses[0], no_dropout_first_loss(), rtol=1e-3)


def no_dropout_first_loss() -> float:
    trainer = make_trainer(rng_seed=None)
    state = trainer.init_state(FIXED)
    _, metrics = trainer.compile_step(FIXED)(state, trainer.put_batch(ragged_batch(0), FIXED))
    return float(metrics["loss"])


def test_policies_refuse_bad_values_and_mismatched_nonfinite_handling(tmp_path):
    with pytest.raises(InvalidArgument, match="CheckpointPolicy.every must be a positive int"):
        CheckpointPolicy(every=0)
    with pytest.raises(InvalidArgument, match="switch_via must be 'checkpoint' or 'memory'"):
        SwitchPolicy(via="disk")
    with pytest.raises(InvalidArgument, match="precompile must be"):
        SwitchPolicy(precompile="sometimes")
    with pytest.raises(InvalidArgument, match="set both or neither"):
        ElasticTrainer(make_trainer(), checkpoint_dir=tmp_path / "a", resources=2,
                       checkpoints=CheckpointPolicy(on_nonfinite="skip_step"))
    with pytest.raises(InvalidArgument, match="needs an int p_min"):
        ElasticTrainer(make_trainer(), checkpoint_dir=tmp_path / "b", resources=2,
                       space=SearchSpace(p_min="auto"))
    assert not (tmp_path / "a" / ".meshscale.lock").exists()  # refused before the lock


def test_events_are_typed_and_serialise_to_the_report_json(tmp_path, devices):
    from meshscale.app.report import to_plain
    from meshscale.elastic import events

    trainer = Trainer(lambda: Llama(DROPOUT, rngs=nnx.Rngs(0)), optax.adam(1e-3),
                      global_batch=BATCH, example_batch=ragged_batch(0))
    seen = []
    with ElasticTrainer(trainer, checkpoint_dir=tmp_path / "run", resources=devices[:2],
                        space=SearchSpace(p_min=2), on_event=seen.append,
                        **quiet_policies()) as elastic:
        state = elastic.init(ragged_batch(0))
        elastic.step(state, ragged_batch(0))
    kinds = [type(e) for e in seen]
    assert kinds[:3] == [events.Start, events.Search, events.Switch], kinds
    assert events.Checkpoint in kinds  # the final save
    start, search, switch = seen[:3]
    assert start.step is None and start.num_devices == 2
    assert switch.reason == "start" and switch.after == str(elastic.shape)
    assert search.decision.best.shape == elastic.shape
    plain = to_plain(switch)
    assert plain["event"] == "switch" and plain["after"] == switch.after
    assert list(plain)[:3] == ["event", "time", "step"]  # report.json's order
    assert switch["after"] == switch.after and dict(switch)["reason"] == "start"  # 0.1 reads
    with pytest.raises(dataclasses.FrozenInstanceError):
        switch.reason = "faster"
