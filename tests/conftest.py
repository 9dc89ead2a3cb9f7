"""Test configuration: GPU tests are marked `gpu` and skip cleanly without a GPU build."""

import jax
import numpy as np
import pytest

import w4afp8_jax

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_collection_modifyitems(config, items):
    reason = w4afp8_jax.cuda_unavailable_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=f"CUDA path unavailable: {reason}")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def rng(request):
    """Fresh random data every run; the seed is printed on failure so a case can be replayed."""
    seed = np.random.SeedSequence().entropy % (2**32)
    request.node.user_properties.append(("seed", seed))
    print(f"seed={seed}")
    return np.random.default_rng(seed)
