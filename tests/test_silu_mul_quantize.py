"""silu_mul_quantize (step 4): one case list on every implementation.

Reference path against the float64 model: f32 exp / divide / multiply differ from float64 by a
few f32 ulps (~1e-7 relative), so an fp8 code can flip only where h / scale lies that close to
a rounding midpoint: at most one fp8 ulp, almost always exact (>= 99.9% of the codes). The
dynamic scale (amax of the f32 h / 448) agrees to rtol 1e-6, per tensor or per row (per_token:
each kept row's own, 1 for the rows not kept).

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
from helpers import assert_fp8_close, fp8_bytes, on_every_implementation, run_poisoned


def offsets_with_total(rng, num_experts, total):
    """Random non-decreasing group offsets [E + 1] whose last entry is `total`."""
    inner = np.sort(rng.integers(0, max(total, 0) + 1, size=num_experts - 1))
    return jnp.asarray(np.concatenate([[0], inner, [total]]).astype(np.int32))


def silu_mul_quantize_fn(scale, implementation):
    return jax.jit(lambda c, o: w4.silu_mul_quantize(c, o, scale, implementation=implementation))


def check_against_model(q, s, c1, kept, scale):
    per_token = scale == "per_token"
    h = ref.silu_mul(np.asarray(c1)[:kept])
    want, want_s = ref.quantize_fp8(h, None if per_token else scale, per_row=per_token)
    if per_token:
        s = np.asarray(s)
        assert s.shape == (len(c1),) and s.dtype == np.float32 and np.all(s[kept:] == 1)
        np.testing.assert_allclose(s[:kept], want_s, rtol=1e-6)
    else:
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
         for scale_kind in ("static", "dynamic", "per_token")]


@pytest.mark.parametrize("implementation,rows,inter,kept,scale_kind",
                         on_every_implementation(CASES, cuda=lambda *case: case[-1] != "per_token"))
def test_silu_mul_quantize(rng, implementation, rows, inter, kept, scale_kind):
    c1 = rng.standard_normal((rows, 2 * inter)).astype(np.float32) * 3.0
    if scale_kind == "per_token":  # rows of very different sizes: each gets its own scale
        c1 *= np.exp(rng.uniform(-4, 4, size=(rows, 1))).astype(np.float32)
    c1 = jnp.asarray(c1, jnp.bfloat16)
    offsets = offsets_with_total(rng, 8, kept)
    scale = {"static": 0.01, "dynamic": None, "per_token": "per_token"}[scale_kind]
    got, got_scale = run_poisoned(silu_mul_quantize_fn(scale, implementation), c1, offsets)
    assert got.shape == (rows, inter) and got.dtype == jnp.float8_e4m3fn
    if implementation == "reference":
        check_against_model(got, got_scale, c1, kept, scale)
    else:
        check_against_reference(got, got_scale, c1, offsets, kept, scale)
    q = np.asarray(got[:kept].astype(jnp.float32))
    assert not np.isnan(q).any()


def test_silu_mul_quantize_per_token_non_finite_rows(rng):
    """The non-finite rules per row: a row's scale is over its finite h only (an infinite h
    saturates, a NaN stays in its element), a row with no finite h gets 1, and no row's inf,
    NaN or size reaches another row's scale or codes; rows past group_offsets[E] get 1."""
    rows, inter = 6, 128
    c1 = rng.standard_normal((rows, 2 * inter)).astype(np.float32)
    c1[0, 3] = np.inf                      # gate +inf: h = inf * up
    c1[1, 4], c1[1, inter + 4] = 1.0, np.inf   # up +inf, silu(1) > 0: h = +inf
    c1[2, :inter] = np.nan                 # every h NaN: scale 1
    c1[3] *= 1e4                           # a huge row
    c1 = jnp.asarray(c1, jnp.bfloat16)
    offsets = jnp.asarray([0, 2, 5], jnp.int32)  # row 5 not kept
    q, s = w4.silu_mul_quantize(c1, offsets, "per_token", implementation="reference")
    q, s = np.asarray(q.astype(jnp.float32)), np.asarray(s)
    with np.errstate(over="ignore"):  # exp(1e4) of the huge row's negative gates: silu = -0
        h = ref.silu_mul(np.asarray(c1))
    for r in range(5):
        finite = np.abs(h[r][np.isfinite(h[r])])
        want = np.float32(finite.max()) / np.float32(448) if finite.size else np.float32(1)
        np.testing.assert_allclose(s[r], want, rtol=1e-6)
        alone, _ = w4.silu_mul_quantize(c1[r:r + 1], jnp.asarray([0, 1], jnp.int32), float(s[r]),
                                        implementation="reference")  # the row on its own, at its scale
        np.testing.assert_array_equal(fp8_bytes(q[r:r + 1].astype(ref.FP8)), fp8_bytes(alone))
    up = float(np.asarray(c1[0, inter + 3], np.float32))
    assert q[0, 3] == 448.0 * np.sign(up) and q[1, 4] == 448.0 and s[2] == 1 and np.isnan(q[2]).all()
    assert np.isnan(q).sum() == inter and s[5] == 1 and not np.any(q[5])


@pytest.mark.parametrize("rows", [0, 3])
def test_silu_mul_quantize_per_token_empty(rng, rows):
    """No rows, or no row kept: scale 1 for every row, codes zero."""
    c1 = jnp.asarray(rng.standard_normal((rows, 64)), jnp.bfloat16)
    run = lambda c, o: w4.silu_mul_quantize(c, o, "per_token", implementation="reference")  # noqa: E731
    for fn in (run, jax.jit(run)):
        q, s = fn(c1, jnp.zeros(3, jnp.int32))
        assert q.shape == (rows, 32) and s.shape == (rows,) and s.dtype == jnp.float32
        assert np.all(np.asarray(s) == 1) and not np.any(np.asarray(q.astype(jnp.float32)))


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
