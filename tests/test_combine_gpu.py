"""CUDA combine kernel against the reference path (step 6)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import w4afp8_jax as w4

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("m,k,h", [(1, 8, 7168), (3, 6, 7168), (64, 8, 512), (1000, 1, 136), (7, 8, 100)])
def test_combine_matches_reference(rng, m, k, h):
    e = 16
    ids = rng.integers(-2, e + 2, size=(m, k)).astype(np.int32)  # includes dropped slots
    routing = w4.route(jnp.asarray(ids), e, implementation="reference")
    rows = jnp.asarray(rng.standard_normal((m * k, h)), jnp.bfloat16)
    weights = jnp.asarray(rng.random((m, k)), jnp.float32)
    fn = jax.jit(lambda r, p, w: w4.combine(r, p, w, 2.5, implementation="cuda"))
    got = np.asarray(fn(rows, routing.positions, weights).astype(jnp.float32))
    want = np.asarray(w4.combine(rows, routing.positions, weights, 2.5, implementation="reference").astype(jnp.float32))
    # Same f32 products; only the summation order may differ, so at most one bf16 rounding flip.
    np.testing.assert_allclose(got, want, rtol=2**-7, atol=1e-6)
    assert np.mean(got == want) > 0.99
