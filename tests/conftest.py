"""Test configuration: GPU tests are marked `gpu` and skip cleanly without a GPU build."""

import os

# Expert-parallel tests shard over simulated CPU devices; must be set before JAX starts a backend.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import w4afp8_jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(autouse=True)
def _cuda_targets_registered(request):
    """GPU tests may call private FFI wrappers directly: register the targets first."""
    if "gpu" in request.keywords and w4afp8_jax.cuda_unavailable_reason() is None:
        w4afp8_jax._backend.resolve("cuda")


def pytest_collection_modifyitems(config, items):
    reason = w4afp8_jax.cuda_unavailable_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=f"CUDA path unavailable: {reason}")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _seed(variable: str) -> int:
    """Fresh entropy, or the seed in the environment variable (to replay a failure with the
    seed it printed)."""
    fixed = os.environ.get(variable)
    return int(fixed) if fixed else np.random.SeedSequence().entropy % (2**32)


@pytest.fixture
def rng(request):
    """Fresh random data every run; the seed is printed on failure so a case can be replayed
    (W4AFP8_TEST_SEED=<seed> pytest ... -k <case>)."""
    seed = _seed("W4AFP8_TEST_SEED")
    request.node.user_properties.append(("seed", seed))
    print(f"seed={seed}")
    return np.random.default_rng(seed)


@pytest.fixture(autouse=True)
def _module_seed_in_every_test(request):
    """Every test that uses module-scoped data prints its seed too (the module fixture prints
    only during the first test's setup), so any failing test can be replayed."""
    if "module_rng" in request.fixturenames:
        print(f"module seed={request.getfixturevalue('module_rng')[0]}")


@pytest.fixture(scope="module")
def module_rng():
    """Like `rng`, for module-scoped fixtures (large weights built once per module); the seed is
    printed during the first test's setup (replayed with W4AFP8_TEST_MODULE_SEED) and returned
    with the generator for failure messages."""
    seed = _seed("W4AFP8_TEST_MODULE_SEED")
    print(f"module seed={seed}")
    return seed, np.random.default_rng(seed)
