"""Eight simulated CPU devices for the whole suite, set before jax is imported."""

import os

# Tests check numbers, not speed: XLA's cheaper CPU code generation halves compile times
# (the suite is compile-bound), and every test compares against a reference compiled
# under the same flags. Benchmarks and the demo use XLA's defaults.
os.environ["XLA_FLAGS"] = " ".join([
    os.environ.get("XLA_FLAGS", ""),
    "--xla_force_host_platform_device_count=8",
    "--xla_backend_optimization_level=0",
    "--xla_llvm_disable_expensive_passes=true",
]).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def devices():
    devs = jax.devices()
    assert len(devs) == 8, "tests expect 8 simulated CPU devices (see tests/conftest.py)"
    return devs


def pytest_runtest_setup(item):
    """Fail loudly if `--dist loadgroup` ignores our xdist_group marks (it did, silently,
    with pytest 9.2 and xdist 3.8): grouped modules would launch their jobs twice."""
    if getattr(item.config.option, "loadgroup", False) and \
            item.get_closest_marker("xdist_group") and "@" not in item.nodeid:
        pytest.fail("pytest-xdist ignored this test's xdist_group mark: use a pytest/xdist "
                    "pair that supports --dist loadgroup (see pyproject.toml)", pytrace=False)


# The longest modules first (measured with --durations; groups, `xdist_group`, are handed
# out before single tests anyway): xdist gives out the remaining tests in collection order,
# so the short modules fill the end and no core waits alone on a long test (the longest
# single tests are in test_train and test_tryrun, collected last). Modules stay whole, so
# module fixtures are still set up once per worker. Unlisted modules keep their order,
# after these.
LONGEST_FIRST = ["test_pipeline", "test_contract", "test_elastic", "test_train",
                 "test_sharding", "test_precompile", "test_elastic_options", "test_tryrun",
                 "test_cli_search", "test_cli", "test_models", "test_checkpoint",
                 "test_examples"]


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))
