"""`meshscale.runtime.simulated`: the one place that sets XLA's simulated device count."""

import os

from meshscale.integrations.ray import cpu_worker_env
from meshscale.runtime.launch import child_env
from meshscale.runtime.simulated import DEVICE_COUNT_FLAG, cpu_env, device_environment


def test_cpu_env_replaces_an_earlier_count_and_keeps_other_flags():
    env = cpu_env(3, {"XLA_FLAGS": f"--xla_foo=1 {DEVICE_COUNT_FLAG}=8"})
    assert env == {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_foo=1 {DEVICE_COUNT_FLAG}=3"}
    assert cpu_env(None, {"XLA_FLAGS": "--xla_foo=1"}) == {"JAX_PLATFORMS": "cpu"}


def test_launcher_and_ray_workers_get_their_devices_from_it():
    env = child_env(1, 2, "127.0.0.1:1234", 4, {"XLA_FLAGS": f"{DEVICE_COUNT_FLAG}=8", "A": "b"})
    assert env["XLA_FLAGS"] == f"{DEVICE_COUNT_FLAG}=4" and env["JAX_PLATFORMS"] == "cpu"
    assert env["A"] == "b" and env["MESHSCALE_PROCESS_ID"] == "1"
    assert cpu_worker_env(2) == cpu_env(2)


def test_device_environment_sets_os_environ_and_restores_it():
    before = {k: os.environ.get(k) for k in ("XLA_FLAGS", "JAX_PLATFORMS")}
    with device_environment(5, "cpu"):
        assert f"{DEVICE_COUNT_FLAG}=5" in os.environ["XLA_FLAGS"].split()
        assert os.environ["JAX_PLATFORMS"] == "cpu"
    assert {k: os.environ.get(k) for k in before} == before
    with device_environment(5, "auto"):  # the real devices: nothing changes
        assert {k: os.environ.get(k) for k in before} == before
