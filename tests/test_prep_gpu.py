"""CUDA gather_quantize (step 2) and silu_mul_quantize (step 4) against the reference path.

gather_quantize is one IEEE division and one round-to-nearest-even fp8 conversion per value on
both paths: the kept rows must agree bit for bit. silu_mul_quantize computes exp with CUDA's
expf and the reference with XLA's exp; both are accurate to an ulp or two, so the f32 values
agree to a few ulps and the fp8 results may differ by one code where h / scale lies that close
to a rounding midpoint (expected rate ~1e-6); the test allows that and bounds how often it occurs.
Rows the kernels do not own (at or past group_offsets[E]) are unspecified and not compared.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import w4afp8_jax as w4
from w4afp8_jax.ops.gather_quantize import gather_quantize_reference
from w4afp8_jax.fp8 import dynamic_scale
from w4afp8_jax.ops.route import route_reference

pytestmark = pytest.mark.gpu

FP8_MAX = 448.0


def run_poisoned(fn, *args):
    """Fills freshly freed device memory of the first output's size with fp8 NaN bytes before
    the call, so rows the kernel should have written but did not are unlikely to match."""
    out_shape = jax.eval_shape(fn, *args)[0]
    poison = jnp.full(out_shape.shape, jnp.nan, out_shape.dtype).block_until_ready()
    del poison
    return fn(*args)


def fp8_bytes(x):
    return np.asarray(x).view(np.uint8)


def make_x(rng, m, h, saturate_scale=None):
    """bf16 activations with outliers; with saturate_scale, about 3% of the values lie beyond
    448 * saturate_scale (they must saturate to +-448, never become NaN)."""
    x = rng.standard_normal((m, h)).astype(np.float32)
    x[rng.random((m, h)) < 0.002] *= 50.0
    if saturate_scale is not None:
        x *= 200.0 * saturate_scale
    return jnp.asarray(x, jnp.bfloat16)


def reference_on_cpu(x, positions, scale):
    """gather_quantize_reference on the CPU with a traced scale: an IEEE division, as in the
    kernel (XLA's f32 division on the GPU is not always correctly rounded)."""
    args = jax.device_put((x, positions, scale), jax.devices("cpu")[0])
    return jax.jit(gather_quantize_reference)(*args)


def routed_positions(rng, m, k, e, drop_fraction):
    ids = rng.integers(0, e, size=(m, k))
    ids[rng.random((m, k)) < drop_fraction] = e  # dropped (expert parallelism)
    return route_reference(jnp.asarray(ids.astype(np.int32)), e)


@pytest.mark.parametrize("m,k,h", [(1, 8, 7168), (3, 6, 512), (64, 8, 7168), (1000, 1, 256), (7, 8, 136),
                                   (5, 2, 100), (300, 8, 2048)])
@pytest.mark.parametrize("scale_kind", ["static", "dynamic", "saturating"])
def test_gather_quantize_matches_reference(rng, m, k, h, scale_kind):
    scale = {"static": 0.0173, "dynamic": None, "saturating": 0.02}[scale_kind]
    x = make_x(rng, m, h, saturate_scale=scale if scale_kind == "saturating" else None)
    routing = routed_positions(rng, m, k, 16, drop_fraction=0.2)
    kept = int(routing.group_offsets[-1])
    fn = jax.jit(lambda x, p: w4.gather_quantize(x, p, scale, implementation="cuda"))
    got, got_scale = run_poisoned(fn, x, routing.positions)
    ref_scale = dynamic_scale(x.astype(jnp.float32)) if scale is None else jnp.float32(scale)
    # The reference on the CPU, with the scale as a traced argument: an IEEE division, as in the
    # kernel (XLA's GPU f32 division is not always correctly rounded).
    want = reference_on_cpu(x, routing.positions, ref_scale)
    assert got.shape == (m * k, h) and got.dtype == jnp.float8_e4m3fn
    np.testing.assert_array_equal(np.asarray(got_scale), np.asarray(ref_scale))
    np.testing.assert_array_equal(fp8_bytes(got)[:kept], fp8_bytes(want)[:kept])
    q = np.asarray(got[:kept].astype(jnp.float32))
    assert not np.isnan(q).any() and np.abs(q).max() <= FP8_MAX
    if scale_kind == "saturating":
        assert np.mean(np.abs(q) == FP8_MAX) > 0.005


def test_gather_quantize_rows_follow_positions(rng):
    """Hand-made positions: a permutation of some rows, the rest out of range in every way
    (-1, M*k, huge, negative); the named rows are written, nothing else is required."""
    m, k, h = 40, 4, 256
    rows = m * k
    perm = rng.permutation(rows).reshape(m, k).astype(np.int64)
    bad = rng.random((m, k)) < 0.3
    perm[bad] = rng.choice(np.array([-1, rows, rows + 7, 2**31 - 1, -(2**31)]), size=int(bad.sum()))
    positions = jnp.asarray(perm.astype(np.int32))
    x = make_x(rng, m, h)
    fn = jax.jit(lambda x, p, s: w4.gather_quantize(x, p, s, implementation="cuda")[0])
    for x_run in (x, make_x(rng, m, h)):  # a second x: every named row must change with it
        want = fp8_bytes(reference_on_cpu(x_run, positions, jnp.float32(0.01)))
        got = fp8_bytes(fn(x_run, positions, jnp.float32(0.01)))
        named = perm[(perm >= 0) & (perm < rows)]
        np.testing.assert_array_equal(got[named], want[named])


def test_gather_quantize_after_cuda_route(rng):
    """Steps 1 and 2 back to back on the CUDA path inside one jit, rerun with new data."""
    m, k, e, h = 64, 8, 256, 7168

    @jax.jit
    def prep(x, ids):
        r = w4.route(ids, e, implementation="cuda")
        q, _ = w4.gather_quantize(x, r.positions, 0.05, implementation="cuda")
        return q, r.group_offsets

    for _ in range(3):
        ids = rng.integers(-1, e + 1, size=(m, k)).astype(np.int32)
        x = make_x(rng, m, h)
        q, offsets = prep(x, jnp.asarray(ids))
        r = route_reference(jnp.asarray(ids), e)
        want = reference_on_cpu(x, r.positions, jnp.float32(0.05))
        kept = int(r.group_offsets[-1])
        np.testing.assert_array_equal(np.asarray(offsets), np.asarray(r.group_offsets))
        np.testing.assert_array_equal(fp8_bytes(q)[:kept], fp8_bytes(want)[:kept])


def offsets_with_total(rng, num_experts, total):
    """Random non-decreasing group offsets [E + 1] whose last entry is `total`."""
    inner = np.sort(rng.integers(0, max(total, 0) + 1, size=num_experts - 1))
    return jnp.asarray(np.concatenate([[0], inner, [total]]).astype(np.int32))


def assert_fp8_close(got, want, max_flip_rate=1e-3):
    """Equal bytes, except rare one-code flips between adjacent fp8 values of the same sign."""
    g, w = fp8_bytes(got).astype(np.int32), fp8_bytes(want).astype(np.int32)
    differ = g != w
    if not differ.any():
        return
    same_sign = (g & 0x80) == (w & 0x80)
    adjacent = same_sign & (np.abs((g & 0x7F) - (w & 0x7F)) == 1)
    assert adjacent[differ].all(), f"non-adjacent fp8 mismatches: {np.count_nonzero(differ & ~adjacent)}"
    assert differ.mean() <= max_flip_rate, f"{differ.sum()} of {differ.size} values flipped"


@pytest.mark.parametrize("rows,inter,kept", [(8, 256, 8), (64, 512, 40), (512, 512, 300), (37, 40, 20),
                                             (4, 24, 4), (2048, 1024, 2047), (16, 512, 0)])
@pytest.mark.parametrize("scale_kind", ["static", "dynamic"])
def test_silu_mul_quantize_matches_reference(rng, rows, inter, kept, scale_kind):
    c1 = jnp.asarray(rng.standard_normal((rows, 2 * inter)).astype(np.float32) * 3.0, jnp.bfloat16)
    offsets = offsets_with_total(rng, 8, kept)
    scale = 0.01 if scale_kind == "static" else None  # static 0.01 saturates the largest values
    fn = jax.jit(lambda c, o: w4.silu_mul_quantize(c, o, scale, implementation="cuda"))
    got, got_scale = run_poisoned(fn, c1, offsets)
    ref_fn = jax.jit(lambda c, o: w4.silu_mul_quantize(c, o, scale, implementation="reference"))
    want, want_scale = ref_fn(c1, offsets)
    assert got.shape == (rows, inter) and got.dtype == jnp.float8_e4m3fn
    np.testing.assert_array_equal(np.asarray(got_scale), np.asarray(want_scale))
    assert_fp8_close(got[:kept], want[:kept])
    q = np.asarray(got[:kept].astype(jnp.float32))
    assert not np.isnan(q).any()


@pytest.mark.parametrize("total", [-5, 10**6])
def test_silu_mul_quantize_clamps_kept_count(rng, total):
    """offsets[E] outside [0, R] is clamped on the device: no rows, or all rows."""
    rows, inter = 32, 128
    c1 = jnp.asarray(rng.standard_normal((rows, 2 * inter)), jnp.bfloat16)
    offsets = jnp.asarray(np.array([0, 3, total], np.int32))
    got, _ = jax.jit(lambda c, o: w4.silu_mul_quantize(c, o, 0.02, implementation="cuda"))(c1, offsets)
    if total > rows:
        full = jnp.asarray(np.array([0, 3, rows], np.int32))
        want, _ = w4.silu_mul_quantize(c1, full, 0.02, implementation="reference")
        assert_fp8_close(got, want)
    else:
        jax.block_until_ready(got)  # nothing to compare; the launch must simply succeed


def test_silu_mul_quantize_same_executable_new_counts(rng):
    """The kept count changes between runs of one executable: it is read on the device."""
    rows, inter = 256, 512
    fn = jax.jit(lambda c, o: w4.silu_mul_quantize(c, o, 0.02, implementation="cuda")[0])
    for kept in (256, 17, 128, 0, 255):
        c1 = jnp.asarray(rng.standard_normal((rows, 2 * inter)), jnp.bfloat16)
        offsets = offsets_with_total(rng, 4, kept)
        got = run_poisoned(lambda c, o: (fn(c, o),), c1, offsets)[0]
        want, _ = w4.silu_mul_quantize(c1, offsets, 0.02, implementation="reference")
        assert_fp8_close(got[:kept], want[:kept])
