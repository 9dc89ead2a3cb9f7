"""silu_mul_quantize (step 4): one case list on every implementation.

Reference path against the float64 model: f32 exp / divide / multiply differ from float64 by a
few f32 ulps (~1e-7 relative), so an fp8 code can flip only where h / scale lies that close to
a rounding midpoint: at most one fp8 ulp, almost always exact (>= 99.9% of the codes). The
dynamic scale (amax of the f32 h / 448) agrees to rtol 1e-6.

CUDA path against the reference path (jitted on the default device, as the step has always been
compared: the dynamic scale must match exactly, which the GPU reference does): CUDA's expf and
XLA's exp are both accurate to an ulp or two, so the f32 values agree to a few ulps and the fp8
results may differ by one code where h / scale lies that close to a rounding midpoint (expected
rate ~1e-6); the test allows adjacent-code flips and bounds how often they occur. Rows the
kernels do not own (at or past group_offsets[E]) are zero on the reference path and unspecified
on the CUDA path (not compared).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import numpy_model as ref
import w4afp8_jax as w4
from helpers import assert_fp8_close, on_every_implementation, run_poisoned


def offsets_with_total(rng, num_experts, total):
    """Random non-decreasing group offsets [E + 1] whose last entry is `total`."""
    inner = np.sort(rng.integers(0, max(total, 0) + 1, size=num_experts - 1))
    return jnp.asarray(np.concatenate([[0], inner, [total]]).astype(np.int32))


def silu_mul_quantize_fn(scale, implementation):
    return jax.jit(lambda c, o: w4.silu_mul_quantize(c, o, scale, implementation=implementation))


def check_against_model(q, s, c1, kept, scale):
    want, want_s = ref.quantize_fp8(ref.silu_mul(np.asarray(c1)[:kept]), scale)
    np.testing.assert_allclose(float(s), float(want_s), rtol=1e-6)
    q = np.asarray(q)
    diff = np.abs(ref.fp8_ordinal(q[:kept]) - ref.fp8_ordinal(want))
    # A flip needs the f32 quotient within a few f32 ulps (~1e-7 relative) of an fp8 midpoint.
    assert diff.max(initial=0) <= 1 and (diff.size == 0 or np.mean(diff == 0) >= 0.999)
    assert np.all(q[kept:].astype(np.float32) == 0)


def check_against_reference(q, s, c1, offsets, kept, scale):
    want, want_s = silu_mul_quantize_fn(scale, "reference")(c1, offsets)
    np.testing.assert_array_equal(np.asarray(s), np.asarray(want_s))
    assert_fp8_close(q[:kept], want[:kept])


# (R, I, kept rows) x scale: static 0.01 saturates the largest values.
CASES = [pytest.param(rows, inter, kept, scale_kind, id=f"{rows}-{inter}-{kept}-{scale_kind}")
         for rows, inter, kept in [(8, 256, 8), (64, 512, 40), (300, 512, 250), (512, 512, 300), (37, 40, 20),
                                   (4, 24, 4), (2048, 1024, 2047), (16, 512, 0)]
         for scale_kind in ("static", "dynamic")]


@pytest.mark.parametrize("implementation,rows,inter,kept,scale_kind", on_every_implementation(CASES))
def test_silu_mul_quantize(rng, implementation, rows, inter, kept, scale_kind):
    c1 = jnp.asarray(rng.standard_normal((rows, 2 * inter)).astype(np.float32) * 3.0, jnp.bfloat16)
    offsets = offsets_with_total(rng, 8, kept)
    scale = 0.01 if scale_kind == "static" else None
    got, got_scale = run_poisoned(silu_mul_quantize_fn(scale, implementation), c1, offsets)
    assert got.shape == (rows, inter) and got.dtype == jnp.float8_e4m3fn
    if implementation == "reference":
        check_against_model(got, got_scale, c1, kept, scale)
    else:
        check_against_reference(got, got_scale, c1, offsets, kept, scale)
    q = np.asarray(got[:kept].astype(jnp.float32))
    assert not np.isnan(q).any()


@pytest.mark.gpu
@pytest.mark.parametrize("total", [-5, 10**6])
def test_silu_mul_quantize_clamps_kept_count(rng, total):
    """offsets[E] outside [0, R] is clamped on the device: no rows, or all rows."""
    rows, inter = 32, 128
    c1 = jnp.asarray(rng.standard_normal((rows, 2 * inter)), jnp.bfloat16)
    offsets = jnp.asarray(np.array([0, 3, total], np.int32))
    got, _ = silu_mul_quantize_fn(0.02, "cuda")(c1, offsets)
    if total > rows:
        full = jnp.asarray(np.array([0, 3, rows], np.int32))
        want, _ = w4.silu_mul_quantize(c1, full, 0.02, implementation="reference")
        assert_fp8_close(got, want)
    else:
        jax.block_until_ready(got)  # nothing to compare; the launch must simply succeed


@pytest.mark.gpu
def test_silu_mul_quantize_same_executable_new_counts(rng):
    """The kept count changes between runs of one executable: it is read on the device."""
    rows, inter = 256, 512
    fn = silu_mul_quantize_fn(0.02, "cuda")
    for kept in (256, 17, 128, 0, 255):
        c1 = jnp.asarray(rng.standard_normal((rows, 2 * inter)), jnp.bfloat16)
        offsets = offsets_with_total(rng, 4, kept)
        got, _ = run_poisoned(fn, c1, offsets)
        want, _ = w4.silu_mul_quantize(c1, offsets, 0.02, implementation="reference")
        assert_fp8_close(got[:kept], want[:kept])
