"""Test configuration: GPU tests are marked `gpu` and skip cleanly without a GPU build, and every
test's random data comes from a seed derived from its name, so every run of a test draws the
same data (`_seed`; W4AFP8_TEST_SEED=random draws fresh seeds: scripts/seed_sweep.py)."""

import os
import zlib

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


def _seed(variable: str, name: str) -> int:
    """The seed of `name` (a test's id, a module's file name): crc32 of the name, the same on
    every run and machine (Python's hash() is salted per process). With the environment variable
    set: an integer replays that seed (the one a failure printed), `random` draws fresh entropy."""
    value = os.environ.get(variable, "").strip()
    if value == "random":
        return int(np.random.SeedSequence().entropy % 2**32)
    return int(value) if value else zlib.crc32(name.encode())


def _test_seed(request) -> int:
    """The seed of the running test, from its id without the directory ("test_moe.py::test_moe[...]",
    however pytest was invoked); printed (shown on failure, always with -s) and recorded for
    scripts/seed_sweep.py's JUnit XML."""
    path, _, rest = request.node.nodeid.partition("::")
    seed = _seed("W4AFP8_TEST_SEED", f"{os.path.basename(path)}::{rest}")
    request.node.user_properties.append(("seed", seed))
    print(f"seed={seed}")
    return seed


@pytest.fixture
def rng(request):
    """The test's generator (seed from its id; W4AFP8_TEST_SEED=<seed> pytest ... -k <case>
    replays a printed one)."""
    return np.random.default_rng(_test_seed(request))


@pytest.fixture(autouse=True)
def _hypothesis_seed(request):
    """Hypothesis tests draw their examples from the test's seed too (hypothesis.seed also turns
    off the example database, which would replay earlier runs' failures first)."""
    if getattr(request.function, "is_hypothesis_test", False):
        import hypothesis

        hypothesis.seed(_test_seed(request))(request.function)


@pytest.fixture(autouse=True)
def _module_seed_in_every_test(request):
    """Every test that uses module-scoped data prints its seed too (the module fixture prints
    only during the first test's setup), so any failing test can be replayed."""
    if "module_rng" in request.fixturenames:
        seed = request.getfixturevalue("module_rng")[0]
        request.node.user_properties.append(("module seed", seed))
        print(f"module seed={seed}")


@pytest.fixture(scope="module")
def module_rng(request):
    """Like `rng`, for module-scoped fixtures (large weights built once per module): the seed
    comes from the module's file name (W4AFP8_TEST_MODULE_SEED replays or randomizes it like
    W4AFP8_TEST_SEED) and is returned with the generator for failure messages."""
    seed = _seed("W4AFP8_TEST_MODULE_SEED", request.node.path.name)
    print(f"module seed={seed}")
    return seed, np.random.default_rng(seed)
