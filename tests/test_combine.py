"""combine (step 6): one case list on every implementation.

Reference path against the float64 model: bf16 rounding (2^-8 relative) plus the f32
accumulation of <= k + 1 terms ((k + 2) 2^-24 of the sum of |terms|); the result equals the
model's bf16 rounding for >= 99% of the elements (a flip needs the exact value within that f32
error of a rounding boundary).

CUDA path against the reference path on the CPU: the same f32 products, only the summation
order may differ, so at most one bf16 rounding flip per element, and rare.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import numpy_model as ref
import w4afp8_jax as w4
from helpers import on_every_implementation, reference_on_cpu
from w4afp8_jax.shapes import DEEPSEEK_V3

H = DEEPSEEK_V3.hidden


def combine_fn(implementation, rsf):
    return jax.jit(lambda r, p, w: w4.combine(r, p, w, rsf, implementation=implementation))


def check_against_model(got, rows, positions, weights, rsf):
    k = positions.shape[1]
    got = np.asarray(got).astype(np.float64)
    exact = ref.combine(rows, positions, weights, rsf, rounded=False)
    absum = ref.combine(np.abs(rows.astype(np.float64)), positions, weights, rsf, rounded=False)
    # bf16 rounding (2^-8 relative) + f32 accumulation of <= k + 1 terms ((k + 2) 2^-24 of |terms|).
    d = (k + 2) * 2.0**-24 * absum
    assert np.all(np.abs(got - exact) <= 2.0**-8 * (np.abs(exact) + d) + d)
    assert np.mean(got == ref.combine(rows, positions, weights, rsf).astype(np.float64)) >= 0.99


def check_against_reference(got, rows, positions, weights, rsf):
    got = np.asarray(got.astype(jnp.float32))
    want = np.asarray(reference_on_cpu(combine_fn("reference", rsf), rows, positions, weights).astype(jnp.float32))
    # Same f32 products; only the summation order may differ, so at most one bf16 rounding flip.
    np.testing.assert_allclose(got, want, rtol=2**-7, atol=1e-6)
    assert np.mean(got == want) > 0.99


# (M, k, H, E, routed_scaling_factor); ids in [-2, E + 2) include dropped slots.
CASES = [pytest.param(*case, id="-".join(map(str, case))) for case in [
    (1, 8, H, 16, 2.5), (3, 6, H, 16, 2.5), (20, 8, 512, 32, 1.0), (20, 8, 512, 32, 2.5), (64, 8, 512, 16, 2.5),
    (1000, 1, 136, 16, 2.5), (7, 8, 100, 16, 2.5)]]


@pytest.mark.parametrize("implementation,m,k,h,e,rsf", on_every_implementation(CASES))
def test_combine(rng, implementation, m, k, h, e, rsf):
    ids = rng.integers(-2, e + 2, size=(m, k)).astype(np.int32)
    _, _, positions = ref.route(ids, e)
    positions = positions.astype(np.int32)
    rows = rng.standard_normal((m * k, h)).astype(ref.BF16)
    weights = rng.random((m, k)).astype(np.float32)
    got = combine_fn(implementation, rsf)(jnp.asarray(rows), jnp.asarray(positions), jnp.asarray(weights))
    assert got.dtype == jnp.bfloat16 and got.shape == (m, h)
    if implementation == "reference":
        check_against_model(got, rows, positions, weights, rsf)
    else:
        check_against_reference(got, jnp.asarray(rows), jnp.asarray(positions), jnp.asarray(weights), rsf)
