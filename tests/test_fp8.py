"""quantize_fp8: saturating e4m3 quantization with static or dynamic per-tensor scales.

The spec's rule is exact (q = round-to-nearest-even(saturate(x / scale)), f32 division), so
every comparison with the NumPy model (ml_dtypes rounding) is bit-exact."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import numpy_model as ref
import w4afp8_jax as w4

FP8_BYTES = np.arange(256, dtype=np.uint8).view(ref.FP8)
FINITE_FP8 = np.unique(FP8_BYTES[~np.isnan(FP8_BYTES.astype(np.float32))].astype(np.float32))  # sorted


def assert_fp8_equal(got, want):
    got = np.asarray(got)
    assert got.dtype == ref.FP8
    np.testing.assert_array_equal(got.view(np.uint8), np.asarray(want).view(np.uint8))


def random_activations(rng, shape, dtype):
    # Magnitudes spread over many binades so subnormal, normal and saturating fp8 codes all occur.
    x = rng.standard_normal(shape) * np.exp(rng.uniform(-8, 8, size=shape))
    return x.astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16, np.float16])
@pytest.mark.parametrize("shape", [(1, 7), (64, 7168), (1 << 20,)])
def test_static_scale_matches_model(rng, dtype, shape):
    x = random_activations(rng, shape, dtype)
    scale = float(np.exp(rng.uniform(-3, 3)))
    q, s = w4.quantize_fp8(jnp.asarray(x), scale)
    assert s.dtype == jnp.float32 and s.shape == () and float(s) == np.float32(scale)
    want, _ = ref.quantize_fp8(x, scale)
    assert_fp8_equal(q, want)


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
@pytest.mark.parametrize("shape", [(1, 7), (64, 7168), (1 << 20,)])
def test_dynamic_scale_matches_model(rng, dtype, shape):
    x = random_activations(rng, shape, dtype)
    q, s = w4.quantize_fp8(jnp.asarray(x))
    want_q, want_s = ref.quantize_fp8(x)
    # amax / 448 in f32, and the element with the largest magnitude lands exactly on +-448.
    assert s.dtype == jnp.float32 and s.shape == ()
    assert np.float32(s) == want_s == np.float32(np.abs(x.astype(np.float32)).max()) / np.float32(448)
    assert_fp8_equal(q, want_q)
    i = np.abs(x.astype(np.float32)).argmax()
    assert np.asarray(q).reshape(-1)[i].astype(np.float32) == 448.0 * np.sign(x.reshape(-1)[i].astype(np.float32))
    assert np.abs(np.asarray(q).astype(np.float32)).max() == 448.0


def test_under_jit_static_traced_and_dynamic(rng):
    x = random_activations(rng, (257, 1000), np.float32)
    scale = float(np.exp(rng.uniform(-3, 3)))
    want_static, _ = ref.quantize_fp8(x, scale)
    want_dyn, want_s = ref.quantize_fp8(x)
    # static scale baked into the trace as a constant
    q, s = jax.jit(lambda a: w4.quantize_fp8(a, scale))(jnp.asarray(x))
    assert_fp8_equal(q, want_static)
    # scale passed as a traced argument
    q, s = jax.jit(w4.quantize_fp8)(jnp.asarray(x), jnp.float32(scale))
    assert_fp8_equal(q, want_static)
    # dynamic scale computed inside the trace
    q, s = jax.jit(lambda a: w4.quantize_fp8(a))(jnp.asarray(x))
    assert np.float32(s) == want_s
    assert_fp8_equal(q, want_dyn)


def test_saturation_never_nan(rng):
    # Huge finite inputs (up to the f32 / bf16 maximum) and infinities saturate to +-448.
    sign = rng.choice([-1.0, 1.0], size=4096)
    mags = np.exp(rng.uniform(np.log(449.0), np.log(3.0e38), size=4096))
    x = (sign * mags).astype(np.float32)
    x[:2] = [np.inf, -np.inf]
    for scale in (1.0, float(rng.uniform(1e-3, 1.0))):
        q, _ = w4.quantize_fp8(jnp.asarray(x), scale)
        qf = np.asarray(q).astype(np.float32)
        assert not np.isnan(qf).any()
        np.testing.assert_array_equal(qf, 448.0 * np.sign(x))
    xb = (sign * np.exp(rng.uniform(np.log(449.0), np.log(3.3e38), size=4096))).astype(ml_dtypes.bfloat16)
    q, _ = w4.quantize_fp8(jnp.asarray(xb), float(rng.uniform(0.1, 1.0)))  # |xb| / scale > 448
    np.testing.assert_array_equal(np.asarray(q).astype(np.float32), 448.0 * np.sign(xb.astype(np.float32)))
    # A tiny static scale overflows x / scale to inf in f32: still +-448, never NaN.
    y = random_activations(rng, (1000,), np.float32)
    q, _ = w4.quantize_fp8(jnp.asarray(y), 1e-37)
    qf = np.asarray(q).astype(np.float32)
    assert not np.isnan(qf).any() and np.all(np.abs(qf[np.abs(y) > 1e-33]) == 448.0)
    # Dynamic scale with values near the f32 maximum: no overflow anywhere.
    z = random_activations(rng, (1000,), np.float32) * np.float32(1e30)
    q, s = w4.quantize_fp8(jnp.asarray(z))
    assert np.isfinite(float(s)) and not np.isnan(np.asarray(q).astype(np.float32)).any()
    assert_fp8_equal(q, ref.quantize_fp8(z)[0])


def test_round_to_nearest_even_at_midpoints(rng):
    # Midpoints of adjacent finite fp8 values are exact in f32; with scale 1 the quotient is
    # the midpoint itself, which must round to the neighbour with an even code (lowest bit 0).
    pos = FINITE_FP8[FINITE_FP8 >= 0]
    i = rng.integers(0, len(pos) - 1, size=2000)
    lo, hi = pos[i], pos[i + 1]
    sign = rng.choice([-1.0, 1.0], size=2000).astype(np.float32)
    mid = ((lo + hi) / 2).astype(np.float32) * sign
    q, _ = w4.quantize_fp8(jnp.asarray(mid), 1.0)
    lo_code = lo.astype(ref.FP8).view(np.uint8)
    even = np.where(lo_code % 2 == 0, lo, hi) * sign
    np.testing.assert_array_equal(np.asarray(q).astype(np.float32), even)
    assert_fp8_equal(q, ref.quantize_fp8(mid, 1.0)[0])
    # Values just above 448 (below the next would-be code 480, and beyond) clip to 448.
    over = rng.uniform(448.0, 1e4, size=1000).astype(np.float32)
    q, _ = w4.quantize_fp8(jnp.asarray(over), 1.0)
    assert np.all(np.asarray(q).astype(np.float32) == 448.0)


def test_every_fp8_value_is_a_fixed_point(rng):
    # x already on the fp8 grid times a power-of-two scale: quantizing must return x exactly.
    scale = float(2.0 ** rng.integers(-10, 10))
    x = (FINITE_FP8[rng.permutation(len(FINITE_FP8))] * np.float32(scale)).astype(np.float32)
    q, _ = w4.quantize_fp8(jnp.asarray(x), scale)
    np.testing.assert_array_equal(np.asarray(q).astype(np.float32) * np.float32(scale), x)


def test_all_zero_tensor_gets_scale_one():
    # The documented edge case: amax = 0 gives scale 1 (not 0, which would make 0/0 = NaN).
    q, s = w4.quantize_fp8(jnp.zeros((4, 8), jnp.bfloat16))
    assert float(s) == 1.0
    assert np.all(np.asarray(q).astype(np.float32) == 0.0)


def test_dynamic_scale_range_rule():
    # max(amax / 448, 2**-126), and 1 below 2**-126 (zero, subnormal, NaN: docs/numerics.md).
    from w4afp8_jax.fp8 import finite_amax, scale_from_amax
    tiny = np.finfo(np.float32).tiny
    cases = [(448.0, 1.0), (1.0, np.float32(1) / np.float32(448)), (448 * tiny, tiny), (448 * tiny / 3, tiny),
             (tiny, tiny), (tiny / 2, 1.0), (0.0, 1.0), (np.nan, 1.0), (3.0e38, np.float32(3.0e38) / np.float32(448))]
    for amax, want in cases:
        assert float(scale_from_amax(jnp.float32(amax))) == np.float32(want), amax
    x = jnp.asarray([[-3.0, jnp.nan], [jnp.inf, 2.0], [-jnp.inf, 0.5]])
    assert float(finite_amax(x)) == 3.0
    assert float(finite_amax(jnp.zeros((0, 4)))) == 0.0
    assert float(finite_amax(jnp.asarray([jnp.nan, jnp.inf]))) == 0.0
