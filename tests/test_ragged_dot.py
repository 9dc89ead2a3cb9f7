"""ragged_dot against jax.lax.ragged_dot on the dequantized operands.

Bound: both sides sum the same exact products (fp8 value x int4 value x scales) in f32, ours per
128-wide K group then across groups, lax.ragged_dot in its own order; each f32 sum of K terms is
within K * 2^-24 * sum|terms| of the exact one (K = 256: 2^-16; 2^-14 leaves room). Ours is then
rounded to bf16: half an ulp, 2^-9 relative. So |got - want| <= 2^-8 |want| + 2^-14 sum|terms|;
a wrong group, row, scale or orientation gives O(1) errors.

precision=DEFAULT on the CUDA path (fp8 wgmma): each K = 32 instruction aligns its 32 products
and the incoming sum of the group to the largest of them, keeping about 14 bits (2^-13
relative), so a group of four instructions is off by at most 4 * 33 * 2^-13 < 2^-5.9 of its
sum of |terms|, and the whole dot by 2^-5 * sum|terms| at worst (elementwise); the normwise
error measured on such data is ~1e-3, bounded by 2e-3 as in tests/test_grouped_gemm.py.
"""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import w4afp8_jax as w4

G, N, K, M = 4, 32, 256, 20
SIZES = [3, 0, 7, 5]  # 15 rows in groups, 5 rows of padding
HP = jax.lax.Precision.HIGHEST


@pytest.fixture
def operands(rng):
    rhs = w4.W4Weights(jnp.asarray(rng.integers(0, 256, size=(G, N, K // 2), dtype=np.uint8)),
                       jnp.asarray((rng.random((G, N, K // 128)) * 0.01 + 1e-3).astype(np.float32)))
    x = rng.standard_normal((M, K)).astype(np.float32)
    x[sum(SIZES):] = 1e4  # padding rows: must neither show up in the output nor set a dynamic scale
    return x, rhs


def lax_reference(lhs_f32, rhs, sizes):
    w = rhs.dequantize().transpose(0, 2, 1)  # ragged_dot's rhs is [G, K, N]
    want = jax.lax.ragged_dot(jnp.asarray(lhs_f32), w, jnp.asarray(sizes, jnp.int32), precision=HP,
                              preferred_element_type=jnp.float32)
    mag = jax.lax.ragged_dot(jnp.abs(jnp.asarray(lhs_f32)), jnp.abs(w), jnp.asarray(sizes, jnp.int32), precision=HP,
                             preferred_element_type=jnp.float32)
    return np.asarray(want), np.asarray(mag)


def assert_matches(got, lhs_f32, rhs, sizes=SIZES, default=False):
    """The bound at the top; default: precision=DEFAULT's (below)."""
    want, mag = lax_reference(lhs_f32, rhs, sizes)
    got = np.asarray(got.astype(jnp.float32))
    rows = sum(sizes)
    assert np.abs(want[:rows]).max() > 0
    assert np.all(np.abs(got - want) <= 2**-8 * np.abs(want) + (2**-5 if default else 2**-14) * mag)
    if default:
        assert np.linalg.norm(got - want) <= 2e-3 * np.linalg.norm(want)
    assert not np.any(got[rows:])  # padding rows are zeros


def fp8_codes(x, scale):
    """The fp8 rule written with numpy: saturate(x / scale) to +-448, round to nearest even."""
    return np.clip(x / np.float32(scale), -448, 448).astype(ml_dtypes.float8_e4m3fn)


def test_fp8_lhs_with_its_scale(operands):
    x, rhs = operands
    scale = np.float32(0.01)
    q = fp8_codes(x, scale)
    got = w4.ragged_dot(jnp.asarray(q), rhs, jnp.asarray(SIZES, jnp.int32), lhs_scale=scale, implementation="reference")
    assert got.dtype == jnp.bfloat16 and got.shape == (M, N)
    assert_matches(got, q.astype(np.float32) * scale, rhs)


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_float_lhs_static_and_dynamic_scale(operands, dtype):
    x, rhs = operands
    x = x.astype(dtype)
    x32 = x.astype(np.float32)
    sizes = jnp.asarray(SIZES, jnp.int32)
    static = np.float32(0.02)
    got = w4.ragged_dot(jnp.asarray(x), rhs, sizes, lhs_scale=static, implementation="reference")
    assert_matches(got, fp8_codes(x32, static).astype(np.float32) * static, rhs)

    dynamic = np.float32(np.abs(x32[:sum(SIZES)]).max() / np.float32(448))  # amax over the grouped rows only
    got = jax.jit(lambda x, s: w4.ragged_dot(x, rhs, s, implementation="reference"))(jnp.asarray(x), sizes)
    assert_matches(got, fp8_codes(x32, dynamic).astype(np.float32) * dynamic, rhs)
    explicit = w4.ragged_dot(jnp.asarray(x), rhs, sizes, lhs_scale=dynamic, implementation="reference")
    np.testing.assert_array_equal(np.asarray(got.astype(jnp.float32)), np.asarray(explicit.astype(jnp.float32)))


def test_per_row_scales(operands):
    """An fp8 lhs with one scale per row [M], and a float lhs with lhs_scale="per_token" (each
    row's own dynamic scale, the same as quantize_fp8(x, "per_token") gives), eagerly and under
    jit; rows of very different sizes, so one scale for all would lose the small ones."""
    x, rhs = operands
    x = x * np.exp(np.linspace(-4, 4, M, dtype=np.float32))[:, None]
    sizes = jnp.asarray(SIZES, jnp.int32)
    scales = np.abs(x).max(axis=1) / np.float32(448)
    q = np.clip(x / scales[:, None], -448, 448).astype(ml_dtypes.float8_e4m3fn)
    want_lhs = q.astype(np.float32) * scales[:, None]
    got = w4.ragged_dot(jnp.asarray(q), rhs, sizes, lhs_scale=scales, implementation="reference")
    assert_matches(got, want_lhs, rhs)
    for run in (w4.ragged_dot, jax.jit(w4.ragged_dot, static_argnames=("lhs_scale", "implementation"))):
        per_token = run(jnp.asarray(x), rhs, sizes, lhs_scale="per_token", implementation="reference")
        np.testing.assert_array_equal(np.asarray(per_token.astype(jnp.float32)), np.asarray(got.astype(jnp.float32)))
    tensor = w4.ragged_dot(jnp.asarray(x), rhs, sizes, implementation="reference")  # the small rows lose codes
    want, _ = lax_reference(want_lhs, rhs, SIZES)
    err = lambda out: np.linalg.norm(np.asarray(out.astype(jnp.float32))[:3] - want[:3])  # noqa: E731
    assert err(tensor) > 10 * err(got)  # group 0: the smallest rows


def test_float32_output_and_drop_in_for_lax(operands):
    x, rhs = operands
    sizes = jnp.asarray(SIZES, jnp.int32)
    bf16 = w4.ragged_dot(jnp.asarray(x), rhs, sizes, lhs_scale=0.02, implementation="reference")
    f32 = w4.ragged_dot(jnp.asarray(x), rhs, sizes, lhs_scale=0.02, preferred_element_type=jnp.float32,
                        precision=HP, implementation="reference")
    assert f32.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(f32), np.asarray(bf16.astype(jnp.float32)))
    # All rows in groups, the last group taking the rest (the usual ragged_dot use).
    sizes = [5, 5, 0, 10]
    xs = x.copy()
    xs[15:] = x[:5]
    got = w4.ragged_dot(jnp.asarray(xs), rhs, jnp.asarray(sizes), lhs_scale=0.02, implementation="reference")
    assert_matches(got, fp8_codes(xs, 0.02).astype(np.float32) * np.float32(0.02), rhs, sizes)


def test_errors_name_the_argument(operands):
    x, rhs = operands
    sizes = jnp.asarray(SIZES, jnp.int32)
    with pytest.raises(ValueError, match=r"group_sizes must have one entry per group of rhs \(4\)"):
        w4.ragged_dot(x, rhs, sizes[:3])
    with pytest.raises(ValueError, match="lhs_scale is required with an fp8 lhs"):
        w4.ragged_dot(jnp.asarray(x).astype(jnp.float8_e4m3fn), rhs, sizes)
    with pytest.raises(ValueError, match="preferred_element_type must be bfloat16 or float32"):
        w4.ragged_dot(x, rhs, sizes, preferred_element_type=jnp.int8)
    with pytest.raises(TypeError, match="rhs must be a W4Weights"):
        w4.ragged_dot(x, rhs.dequantize(), sizes)
    with pytest.raises(TypeError, match="group_sizes must be an integer array"):
        w4.ragged_dot(x, rhs, sizes.astype(jnp.float32))
    with pytest.raises(ValueError, match="lhs has K = 128 columns but rhs expects K = 256"):
        w4.ragged_dot(x[:, :128], rhs, sizes)
    with pytest.raises(ValueError, match=r"group_sizes must be non-negative, got \[3, -1, 7, 5\]"):
        w4.ragged_dot(x, rhs, np.asarray([3, -1, 7, 5], np.int32))
    with pytest.raises(ValueError, match="group_sizes must sum to at most the 20 rows of lhs, got sum 25"):
        w4.ragged_dot(x, rhs, jnp.asarray([3, 0, 7, 15], jnp.int32))
    q = jnp.asarray(x).astype(jnp.float8_e4m3fn)
    with pytest.raises(ValueError, match="lhs_scale is required with an fp8 lhs .* got 'per_token'"):
        w4.ragged_dot(q, rhs, sizes, lhs_scale="per_token")
    with pytest.raises(ValueError, match=r"lhs_scale must be a scalar or hold one scale per row of lhs, shape \(20,\)"):
        w4.ragged_dot(q, rhs, sizes, lhs_scale=np.ones(19, np.float32))
    with pytest.raises(ValueError, match=r"lhs_scale\[3\] is -1.0: row scales must be finite"):
        w4.ragged_dot(q, rhs, sizes, lhs_scale=np.where(np.arange(M) == 3, -1.0, 0.01))
    with pytest.raises(ValueError, match=r"lhs_scale of shape \(20,\): a float lhs is quantized with a static"):
        w4.ragged_dot(x, rhs, sizes, lhs_scale=np.ones(M, np.float32))
    with pytest.raises(ValueError, match='lhs_scale must be a number, None .* or "per_token"'):
        w4.ragged_dot(x, rhs, sizes, lhs_scale="per_row")


def test_traced_group_sizes_past_m_are_clipped(operands):
    """Traced sizes cannot be checked: offsets [0, cumsum] are clipped into [0, M] (documented),
    so sizes summing past M act as if the last group ended at row M."""
    x, rhs = operands
    got = jax.jit(lambda s: w4.ragged_dot(x, rhs, s, lhs_scale=0.02))(jnp.asarray([3, 0, 7, 15], jnp.int32))
    want = w4.ragged_dot(x, rhs, jnp.asarray([3, 0, 7, 10], jnp.int32), lhs_scale=0.02)
    np.testing.assert_array_equal(np.asarray(got.astype(jnp.float32)), np.asarray(want.astype(jnp.float32)))
    assert np.abs(np.asarray(want.astype(jnp.float32))[15:]).max() > 0  # rows 15..19 belong to group 3 here


@pytest.mark.parametrize("wrt", ["lhs", "lhs_scale"])
def test_differentiation_names_ragged_dot(operands, wrt):
    x, rhs = operands
    sizes = jnp.asarray(SIZES, jnp.int32)
    if wrt == "lhs":
        f = lambda v: w4.ragged_dot(v, rhs, sizes).astype(jnp.float32).sum()  # noqa: E731
        arg = jnp.asarray(x)
    else:
        f = lambda v: w4.ragged_dot(x, rhs, sizes, lhs_scale=v).astype(jnp.float32).sum()  # noqa: E731
        arg = jnp.float32(0.02)
    with pytest.raises(TypeError, match=f"ragged_dot is not differentiable with respect to {wrt}:"):
        jax.grad(f)(arg)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", [HP, None])
def test_cuda_path(operands, precision):
    x, rhs = operands
    sizes = jnp.asarray(SIZES, jnp.int32)
    # fp8 codes made on the host: XLA's fused f32 division on the GPU is not correctly rounded,
    # which would move some codes of an on-the-fly quantization (see test_moe_gpu.py).
    q = fp8_codes(x, 0.02)
    got = w4.ragged_dot(jnp.asarray(q), rhs.prepare(), sizes, lhs_scale=0.02, precision=precision,
                        implementation="cuda")
    assert_matches(got, q.astype(np.float32) * np.float32(0.02), rhs, default=precision is None)
