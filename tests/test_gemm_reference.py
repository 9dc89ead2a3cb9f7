"""grouped_gemm reference path (steps 3 / 5) against the float64 NumPy model.

Error bound. The model computes S = lhs_scale * sum_g s[g] * sum_k q[k] w[k] in float64
(every int4 * fp8 product and every group sum exact; the scale products round at ~1e-16).
The reference sums the exact products in f32, scales in f32 and rounds once to bf16, so
    |ref - S| <= 2^-8 (|S| + d) + d,   d = (K + G + 2) * 2^-24 * A,
where 2^-8 is bf16's unit roundoff, A = the same sum over |terms| (also from the model) and
(K + G + 2) 2^-24 A bounds the f32 accumulation error of any summation order of the K products,
G group terms and two scalings. In practice d is far smaller, so nearly every element is within
one bf16 ulp of S: asserted for >= 99.9% of the elements (at most one outlier for small outputs;
an outlier needs |S| within ~2^9 d of 0, i.e. heavy cancellation).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import numpy_model as ref
import w4afp8_jax as w4


def make_problem(rng, e, n, k, rows, counts=None, gs=128, fp8_bytes=False):
    packed = rng.integers(0, 256, size=(e, n, k // 2), dtype=np.uint8)
    scales = (rng.standard_normal((e, n, k // gs)) * 0.005).astype(np.float32)
    if fp8_bytes:  # every finite fp8 code, subnormals and +-448 included
        b = rng.integers(0, 256, size=(rows, k), dtype=np.uint8)
        b[(b & 0x7F) == 0x7F] ^= 1  # 0x7F / 0xFF are NaN in e4m3fn: move to +-448
        lhs, lhs_scale = b.view(ref.FP8), np.float32(np.exp(rng.uniform(-4, 2)))
    else:
        lhs, lhs_scale = ref.quantize_fp8(rng.standard_normal((rows, k)))
    if counts is None:
        used = rng.integers(0, rows + 1)  # some rows past offsets[E]
        counts = np.bincount(rng.integers(0, e, size=used), minlength=e)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    return lhs, lhs_scale, packed, scales, offsets


def check(got, lhs, lhs_scale, packed, scales, offsets, gs=128):
    got = np.asarray(got)
    assert got.dtype == ref.BF16 and got.shape == (lhs.shape[0], packed.shape[1])
    got = got.astype(np.float64)
    want, absum = ref.grouped_gemm(lhs, lhs_scale, packed, scales, offsets, gs, with_abs=True)
    k = lhs.shape[1]
    d = (k + k // gs + 2) * 2.0**-24 * absum
    err = np.abs(got - want)
    assert np.all(err <= 2.0**-8 * (np.abs(want) + d) + d), np.max(err - 2.0**-8 * (np.abs(want) + d) - d)
    outliers = int(np.sum(err > ref.bf16_ulp(want)))
    assert outliers <= max(1, 0.001 * err.size), f"{outliers} of {err.size} elements beyond 1 bf16 ulp"
    np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-3 * np.sqrt(np.mean(want**2)) + 1e-30)
    # Rows at or past offsets[E] are exactly zero.
    assert np.all(got[int(offsets[-1]):] == 0)
    return got


@pytest.mark.parametrize("e,n,k,rows", [
    (1, 16, 128, 5), (1, 48, 1024, 64), (2, 32, 256, 17), (2, 16, 128, 200), (8, 48, 384, 64),
    (8, 16, 256, 1000), (256, 16, 128, 300), (256, 32, 256, 8), (256, 16, 128, 2048)])
def test_matches_model(rng, e, n, k, rows):
    lhs, s, packed, scales, offsets = make_problem(rng, e, n, k, rows)
    w = w4.W4Weights(jnp.asarray(packed), jnp.asarray(scales))
    got = w4.grouped_gemm(jnp.asarray(lhs), s, w, jnp.asarray(offsets), implementation="reference")
    check(got, lhs, s, packed, scales, offsets)


@pytest.mark.parametrize("gs,k", [(32, 96), (64, 512), (2, 8)])
def test_other_group_sizes(rng, gs, k):
    lhs, s, packed, scales, offsets = make_problem(rng, 4, 8, k, 40, gs=gs)
    w = w4.W4Weights(jnp.asarray(packed), jnp.asarray(scales), gs)
    got = w4.grouped_gemm(jnp.asarray(lhs), s, w, jnp.asarray(offsets), implementation="reference")
    check(got, lhs, s, packed, scales, offsets, gs)


def test_full_fp8_range(rng):
    lhs, s, packed, scales, offsets = make_problem(rng, 4, 32, 512, 50, fp8_bytes=True)
    w = w4.W4Weights(jnp.asarray(packed), jnp.asarray(scales))
    got = w4.grouped_gemm(jnp.asarray(lhs), s, w, jnp.asarray(offsets), implementation="reference")
    check(got, lhs, s, packed, scales, offsets)


@pytest.mark.parametrize("rows", [1, 7, 130])
def test_single_hot_expert(rng, rows):
    e = 256
    counts = np.zeros(e, np.int64)
    hot = int(rng.integers(0, e))
    counts[hot] = rows
    lhs, s, packed, scales, offsets = make_problem(rng, e, 16, 256, rows, counts=counts)
    w = w4.W4Weights(jnp.asarray(packed), jnp.asarray(scales))
    got = w4.grouped_gemm(jnp.asarray(lhs), s, w, jnp.asarray(offsets), implementation="reference")
    got = check(got, lhs, s, packed, scales, offsets)
    # The same rows through expert `hot` alone (a 1-expert problem) give the same numbers.
    alone = w4.W4Weights(jnp.asarray(packed[hot:hot + 1]), jnp.asarray(scales[hot:hot + 1]))
    got1 = w4.grouped_gemm(jnp.asarray(lhs), s, alone, jnp.asarray([0, rows], np.int32), implementation="reference")
    check(got1, lhs, s, packed[hot:hot + 1], scales[hot:hot + 1], np.array([0, rows]))


def test_empty_experts_and_no_rows(rng):
    e, rows = 8, 24
    counts = np.zeros(e, np.int64)
    counts[[0, 5]] = [10, 9]  # experts 1-4, 6, 7 empty; rows 19..23 past offsets[E]
    lhs, s, packed, scales, offsets = make_problem(rng, e, 16, 256, rows, counts=counts)
    w = w4.W4Weights(jnp.asarray(packed), jnp.asarray(scales))
    got = w4.grouped_gemm(jnp.asarray(lhs), s, w, jnp.asarray(offsets), implementation="reference")
    check(got, lhs, s, packed, scales, offsets)
    # No rows at all: everything is zero (the rows hold random non-zero fp8 data).
    none = np.zeros(e + 1, np.int32)
    got = w4.grouped_gemm(jnp.asarray(lhs), s, w, jnp.asarray(none), implementation="reference")
    assert np.all(np.asarray(got).astype(np.float32) == 0)


def test_lhs_scale_is_applied_linearly(rng):
    lhs, s, packed, scales, offsets = make_problem(rng, 4, 16, 256, 30)
    w = w4.W4Weights(jnp.asarray(packed), jnp.asarray(scales))
    a = np.asarray(w4.grouped_gemm(jnp.asarray(lhs), s, w, jnp.asarray(offsets), implementation="reference"))
    b = np.asarray(w4.grouped_gemm(jnp.asarray(lhs), 4.0 * s, w, jnp.asarray(offsets), implementation="reference"))
    # Scaling by a power of two commutes with every rounding (no overflow here): exact.
    np.testing.assert_array_equal(b.astype(np.float32), 4.0 * a.astype(np.float32))


def test_under_jit(rng):
    lhs, s, packed, scales, offsets = make_problem(rng, 16, 32, 256, 100)
    w = w4.W4Weights(jnp.asarray(packed), jnp.asarray(scales))
    fn = jax.jit(lambda q, sc, ww, off: w4.grouped_gemm(q, sc, ww, off, implementation="reference"))
    got = fn(jnp.asarray(lhs), jnp.float32(s), w, jnp.asarray(offsets))
    check(got, lhs, s, packed, scales, offsets)
    # Offsets are data, not shapes: a different routing reuses the compiled function.
    lhs2, _, _, _, offsets2 = make_problem(rng, 16, 32, 256, 100)
    got2 = fn(jnp.asarray(lhs2), jnp.float32(s), w, jnp.asarray(offsets2))
    check(got2, lhs2, s, packed, scales, offsets2)
    assert fn._cache_size() == 1
    # Static scale baked in as a constant.
    got3 = jax.jit(lambda q: w4.grouped_gemm(q, float(s), w, jnp.asarray(offsets), implementation="reference"))(
        jnp.asarray(lhs))
    check(got3, lhs, s, packed, scales, offsets)


def test_rows_before_the_first_offset_are_unowned(rng):
    """group_offsets[0] > 0 breaks route's contract; the reference still leaves those rows zero
    instead of giving them an expert's weights."""
    w = w4.W4Weights(jnp.asarray(rng.integers(0, 256, (2, 16, 64), dtype=np.uint8)),
                     jnp.asarray(rng.random((2, 16, 1), dtype=np.float32) + 0.5))
    lhs, scale = w4.quantize_fp8(jnp.asarray(rng.standard_normal((6, 128)), jnp.float32))
    out = np.asarray(w4.grouped_gemm(lhs, scale, w, jnp.asarray([2, 4, 5], jnp.int32),
                                     implementation="reference").astype(jnp.float32))
    assert np.all(out[:2] == 0) and np.all(out[5] == 0)
    assert np.all(np.any(out[2:5] != 0, axis=1))
