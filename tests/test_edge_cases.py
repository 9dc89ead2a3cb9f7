"""The rules of docs/numerics.md ("Rules") for every public op, on both paths: empty batches,
non-finite inputs, tiny scales, host arrays of activations, adversarial indices (group_offsets,
positions, topk_ids) and bitwise-repeatable results (eager, jit, XLA command buffers).

Every case runs on the reference path and, under the gpu mark, on the CUDA path. Expected values
come from the float64 model (tests/numpy_model.py) or from the same computation on inputs where
the rule makes the answer known exactly (e.g. an inf that must quantize like the largest finite
value). The GPU cases are also the lead's compute-sanitizer workload (issue 14, item 7).
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import numpy_model as ref
import w4afp8_jax as w4
from helpers import (EVERY_IMPLEMENTATION, Model, assert_fp8_close, assert_moe_close, bf16_ulps, fp8_bytes,
                     reference_on_cpu, run_poisoned)

E, H, I = 4, 256, 128
TINY = float(np.finfo(np.float32).tiny)  # 2**-126, the smallest normal f32
HIGHEST = jax.lax.Precision.HIGHEST
BF16, FP8 = jnp.bfloat16, jnp.float8_e4m3fn
JIT = [pytest.param(False, id="eager"), pytest.param(True, id="jit")]


@pytest.fixture(autouse=True)
def _reference_path_on_the_cpu(request):
    """Cases of the reference path run on the CPU, where it defines the numerics (XLA's fused
    GPU division and exp are not correctly rounded: helpers.reference_on_cpu)."""
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and callspec.params.get("impl") == "reference":
        with jax.default_device(jax.devices("cpu")[0]):
            yield
    else:
        yield


def maybe_jit(fn, jit):
    return jax.jit(fn) if jit else fn


def layer_weights(rng):
    """(w13 [E, 2I, H], w2 [E, H, I]) with the seed's random int4 codes and scales."""
    def weights(n, k):
        packed = rng.integers(0, 256, size=(E, n, k // 2), dtype=np.uint8)
        scales = (rng.standard_normal((E, n, k // 128)) * 0.005).astype(np.float32)
        return w4.W4Weights(jnp.asarray(packed), jnp.asarray(scales))
    return weights(2 * I, H), weights(H, I)


def tokens(rng, m, k=2, drop=False):
    """x bf16 [m, H], distinct expert ids [m, k] (some dropped: -1 and E), weights [m, k]."""
    x = jnp.asarray(rng.standard_normal((m, H)), BF16)
    ids = np.stack([rng.choice(E, k, replace=False) for _ in range(m)]).astype(np.int32)
    if drop:
        ids[rng.random((m, k)) < 0.3] = rng.choice([-1, E])
    tw = rng.random((m, k)).astype(np.float32) + 0.1
    return x, jnp.asarray(ids), jnp.asarray(tw)


def as_f32(a):
    return np.asarray(jnp.asarray(a).astype(jnp.float32))


# ---------------------------------------------------------------------------------------------
# 1. Empty batches
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", EVERY_IMPLEMENTATION)
@pytest.mark.parametrize("jit", JIT)
def test_empty_batches(rng, impl, jit):
    w13, w2 = layer_weights(rng)
    zeros_offsets = jnp.zeros(E + 1, jnp.int32)
    for m, k in ((0, 8), (0, 0), (3, 0)):
        r = maybe_jit(lambda ids: w4.route(ids, E, implementation=impl), jit)(jnp.zeros((m, k), jnp.int32))
        assert r.rows_per_expert.shape == (E,) and r.group_offsets.shape == (E + 1,) and r.positions.shape == (m, k)
        assert not np.any(np.asarray(r.rows_per_expert)) and not np.any(np.asarray(r.group_offsets))
        x = jnp.asarray(rng.standard_normal((m, H)), BF16)
        # A dynamic scale is over x (1 over no tokens), whether or not any slot is kept.
        for scale, want_scale in ((None, ref.dynamic_scale(np.asarray(x))), (0.5, 0.5)):
            q, s = maybe_jit(lambda x, p: w4.gather_quantize(x, p, scale, implementation=impl), jit)(x, r.positions)
            assert q.shape == (m * k, H) and q.dtype == FP8
            np.testing.assert_allclose(float(s), want_scale, rtol=2e-7)
        tw = jnp.asarray(rng.random((m, k)), jnp.float32)
        rows = jnp.asarray(rng.standard_normal((5, H)), BF16)
        out = maybe_jit(lambda r_, p, t: w4.combine(r_, p, t, 2.5, implementation=impl), jit)(rows, r.positions, tw)
        assert out.shape == (m, H) and out.dtype == BF16 and not np.any(as_f32(out))  # k = 0: all slots dropped
    # R = 0 rows for the GEMM and SiLU steps.
    c = maybe_jit(lambda l, o: w4.grouped_gemm(l, 0.1, w13, o, implementation=impl), jit)(
        jnp.zeros((0, H), FP8), zeros_offsets)
    assert c.shape == (0, 2 * I) and c.dtype == BF16
    q2, s2 = maybe_jit(lambda c1, o: w4.silu_mul_quantize(c1, o, implementation=impl), jit)(
        jnp.zeros((0, 2 * I), BF16), zeros_offsets)
    assert q2.shape == (0, I) and q2.dtype == FP8 and float(s2) == 1.0
    # combine from no rows at all: every slot is dropped (NaN weights included), zeros.
    pos = jnp.asarray(rng.integers(-3, 6, size=(3, 2)), jnp.int32)
    out = w4.combine(jnp.zeros((0, H), BF16), pos, jnp.full((3, 2), jnp.nan), implementation=impl)
    assert out.shape == (3, H) and not np.any(as_f32(out))
    # The layer: an idle rank's [0, H] batch, and k = 0.
    for scales in ({}, dict(a1_scale=0.02, a2_scale=0.01)):
        layer = maybe_jit(lambda x, i, t: w4.moe(x, i, t, w13, w2, implementation=impl, **scales), jit)
        out = layer(jnp.zeros((0, H), BF16), jnp.zeros((0, 8), jnp.int32), jnp.zeros((0, 8), jnp.float32))
        assert out.shape == (0, H) and out.dtype == BF16
        out = layer(jnp.ones((3, H), BF16), jnp.zeros((3, 0), jnp.int32), jnp.zeros((3, 0), jnp.float32))
        assert out.shape == (3, H) and not np.any(as_f32(out))
    q, s = maybe_jit(w4.quantize_fp8, jit)(jnp.zeros((0, 7), jnp.float32))
    assert q.shape == (0, 7) and float(s) == 1.0


@pytest.mark.gpu
def test_empty_batches_launch_no_kernel(rng):
    """Shapes are static: an empty batch returns from Python, so no FFI call is even traced."""
    w13, w2 = layer_weights(rng)
    jaxpr = jax.make_jaxpr(lambda x, i, t: w4.moe(x, i, t, w13, w2, implementation="cuda"))(
        jnp.zeros((0, H), BF16), jnp.zeros((0, 8), jnp.int32), jnp.zeros((0, 8), jnp.float32))
    assert "ffi_call" not in str(jaxpr)
    nonempty = jax.make_jaxpr(lambda x, i, t: w4.moe(x, i, t, w13, w2, implementation="cuda"))(
        jnp.zeros((1, H), BF16), jnp.zeros((1, 8), jnp.int32), jnp.zeros((1, 8), jnp.float32))
    assert "ffi_call" in str(nonempty)  # the check above can fail


# ---------------------------------------------------------------------------------------------
# 2. Non-finite inputs
# ---------------------------------------------------------------------------------------------
def test_quantize_fp8_non_finite_rule():
    # The example: one inf must not become the scale (it used to give q = [0, 0, nan]).
    q, s = w4.quantize_fp8(jnp.asarray([1.0, 2.0, jnp.inf]))
    assert float(s) == np.float32(2.0) / np.float32(448.0)
    np.testing.assert_array_equal(as_f32(q), [224.0, 448.0, 448.0])
    q, s = w4.quantize_fp8(jnp.asarray([-jnp.inf, jnp.nan, 0.5, -1.0]))
    assert float(s) == np.float32(1.0) / np.float32(448.0)
    got = as_f32(q)
    assert got[0] == -448.0 and np.isnan(got[1]) and got[2] == 224.0 and got[3] == -448.0
    q, s = w4.quantize_fp8(jnp.asarray([jnp.nan, jnp.inf, -jnp.inf]))  # no finite value: scale 1
    assert float(s) == 1.0 and np.isnan(as_f32(q)[0]) and list(as_f32(q)[1:]) == [448.0, -448.0]


@pytest.mark.parametrize("impl", EVERY_IMPLEMENTATION)
@pytest.mark.parametrize("jit", JIT)
def test_gather_quantize_non_finite_rule(rng, impl, jit):
    x = rng.standard_normal((5, H)).astype(np.float32)
    x[0, 5], x[1, 7], x[2, 9], x[2, 10] = np.inf, -np.inf, np.nan, np.inf
    xb = x.astype(ref.BF16)
    positions = jnp.asarray(rng.permutation(5 * 2).reshape(5, 2), jnp.int32)
    q, s = maybe_jit(lambda x, p: w4.gather_quantize(x, p, implementation=impl), jit)(jnp.asarray(xb), positions)
    finite = np.abs(xb.astype(np.float32))[np.isfinite(xb.astype(np.float32))]
    # The model's scale: amax over the finite values (an XLA division on the CUDA path's device).
    np.testing.assert_allclose(float(s), ref.dynamic_scale(xb), rtol=2e-7)
    np.testing.assert_allclose(float(s), finite.max() / 448.0, rtol=2e-7)
    want_q, _ = ref.quantize_fp8(xb, float(s))
    rows = as_f32(q)[np.asarray(positions)]  # [5, 2, H]: both slots of every token
    for j in range(2):
        assert rows[0, j, 5] == 448.0 and rows[1, j, 7] == -448.0 and rows[2, j, 10] == 448.0
        assert np.isnan(rows[2, j, 9]) and np.isnan(rows[:, j]).sum() == 1  # NaN only where it was
        np.testing.assert_array_equal(fp8_bytes(q)[np.asarray(positions)[:, j]][~np.isnan(xb.astype(np.float32))],
                                      fp8_bytes(want_q)[~np.isnan(xb.astype(np.float32))])


@pytest.mark.parametrize("impl", EVERY_IMPLEMENTATION)
@pytest.mark.parametrize("jit", JIT)
def test_silu_mul_quantize_non_finite_rule(rng, impl, jit):
    r = 6
    c1 = rng.standard_normal((r, 2 * I)).astype(np.float32)
    c1[0, 3] = np.inf                      # gate +inf: h = inf * up
    c1[1, 4], c1[1, I + 4] = 1.0, np.inf   # up +inf, silu(1) > 0: h = +inf
    c1[2, 5] = np.nan                      # h NaN
    c1 = jnp.asarray(c1, BF16)
    offsets = jnp.asarray([0, 2, 2, 5, r], jnp.int32)
    q, s = maybe_jit(lambda c, o: w4.silu_mul_quantize(c, o, implementation=impl), jit)(c1, offsets)
    _, want_s = reference_on_cpu(lambda c, o: w4.silu_mul_quantize(c, o, implementation="reference"), c1, offsets)
    h = ref.silu_mul(np.asarray(c1))
    assert np.isfinite(float(s))
    np.testing.assert_allclose(float(s), np.abs(h[np.isfinite(h)]).max() / 448.0, rtol=1e-6)
    np.testing.assert_allclose(float(s), float(want_s), rtol=1e-6)  # GPU exp may differ by an ulp
    got = as_f32(q)
    up = float(np.asarray(c1[0, I + 3], np.float32))
    assert got[0, 3] == 448.0 * np.sign(up) and got[1, 4] == 448.0
    assert np.isnan(got[2, 5]) and np.isnan(got).sum() == 1  # the NaN stays where it was
    want_q = ref.to_fp8(h / np.float32(s))
    keep = ~np.isnan(h)
    # float64 h against f32 h with the path's exp: a code can move by one near a midpoint (rare).
    assert_fp8_close(fp8_bytes(q)[keep], fp8_bytes(want_q)[keep], max_flip_rate=3e-3)


@pytest.mark.parametrize("impl", EVERY_IMPLEMENTATION)
@pytest.mark.parametrize("jit", JIT)
@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_moe_non_finite_token_stays_in_its_token(rng, impl, jit, static):
    """An inf quantizes exactly like the largest finite value (+-448), so replacing that value by
    inf changes nothing anywhere; a NaN makes its own token's output NaN and changes no other
    token (its rows are NaN, ignored by the dynamic scales), so every other token is bitwise what
    it is with the NaN token's row all zero."""
    w13, w2 = layer_weights(rng)
    m = 6
    x, ids, tw = tokens(rng, m)
    clean = np.asarray(x).copy()
    clean[1] = 0
    clean[0, 17] = clean[3, 40] = 0
    amax = np.abs(clean.astype(np.float32)).max()  # reached elsewhere: the finite amax of `bad` too
    clean[0, 17] = amax  # the largest |value|: q = +448 here (dynamic scale), as for +inf
    clean[3, 40] = -amax
    bad = clean.copy()
    bad[0, 17], bad[3, 40], bad[1, 100] = np.inf, -np.inf, np.nan
    scales = dict(a1_scale=float(amax) / 448.0, a2_scale=0.01) if static else {}
    layer = maybe_jit(lambda x: w4.moe(x, ids, tw, w13, w2, routed_scaling_factor=2.5, implementation=impl,
                                       precision=HIGHEST, **scales), jit)
    got, want = as_f32(layer(jnp.asarray(bad))), as_f32(layer(jnp.asarray(clean)))
    others = np.arange(m) != 1
    assert np.isnan(got[1]).all()
    assert np.isfinite(got[others]).all() and np.any(got[others])
    np.testing.assert_array_equal(got[others], want[others])


@pytest.mark.parametrize("impl", EVERY_IMPLEMENTATION)
def test_combine_unread_non_finite_rows(rng, impl):
    """Dropped slots read nothing: a NaN or inf in a row no kept slot names never reaches the output."""
    m, k, r = 4, 3, 8
    rows = rng.standard_normal((r, H)).astype(np.float32)
    rows[0], rows[5] = np.nan, np.inf
    pos = np.array([[1, -1, 2], [3, 8, -7], [4, 2**31 - 1, 6], [-(2**31), 7, 1]], np.int32)
    tw = rng.random((m, k)).astype(np.float32)
    tw[0, 1] = np.nan  # a NaN weight of a dropped slot is never used either
    rows_b = jnp.asarray(rows, BF16)
    got = as_f32(w4.combine(rows_b, jnp.asarray(pos), jnp.asarray(tw), 2.5, implementation=impl))
    want = ref.combine(np.asarray(rows_b), np.where((pos >= 0) & (pos < r), pos, -1), tw, 2.5).astype(np.float32)
    assert np.isfinite(got).all()
    assert np.mean(bf16_ulps(got, want) <= 1) >= 0.99  # f32 against float64 sums: rare 1-ulp flips


# ---------------------------------------------------------------------------------------------
# 3. Tiny scales and tiny values
# ---------------------------------------------------------------------------------------------
def test_smallest_normal_scale_gives_the_ieee_answer():
    # The example with the smallest accepted scale: [0, 0, 448, 448], never NaN.
    q, s = w4.quantize_fp8(jnp.asarray([[0.0, 0.0, 0.1, 0.1]]), TINY)
    np.testing.assert_array_equal(as_f32(q), [[0.0, 0.0, 448.0, 448.0]])
    with pytest.raises(ValueError, match="scale must be at least the smallest normal float32"):
        w4.quantize_fp8(jnp.asarray([[0.0, 0.0, 0.1, 0.1]]), 1e-39)


@pytest.mark.parametrize("impl", EVERY_IMPLEMENTATION)
@pytest.mark.parametrize("jit", JIT)
def test_dynamic_scale_of_tiny_values(rng, impl, jit):
    m, k = 4, 2
    positions = jnp.asarray(np.arange(m * k).reshape(m, k), jnp.int32)
    gather = maybe_jit(lambda x, p: w4.gather_quantize(x, p, implementation=impl), jit)
    # Normal values below 448 * 2**-126: amax / 448 would be subnormal, so the scale is 2**-126.
    x = (rng.standard_normal((m, H)) * 1e-37).astype(np.float32)
    x[np.abs(x) < TINY] = 0.0  # no subnormal inputs (the CPU reads them as 0: docs/numerics.md)
    xb = x.astype(ref.BF16)
    xb[np.abs(xb.astype(np.float32)) < TINY] = 0
    q, s = gather(jnp.asarray(xb), positions)
    want_q, want_s = ref.quantize_fp8(xb)
    assert float(s) == want_s == np.float32(TINY)
    got = fp8_bytes(q)[np.asarray(positions)[:, 0]]
    np.testing.assert_array_equal(got, fp8_bytes(want_q))
    assert not np.isnan(as_f32(q)).any() and np.abs(as_f32(q)).max() > 1
    # Only subnormal (or zero) values: treated as all-zero on both paths, scale 1, q = 0.
    sub = np.zeros((m, H), np.float32)
    sub[:, ::3] = 1e-39
    q, s = gather(jnp.asarray(sub.astype(ref.BF16)), positions)
    assert float(s) == 1.0 and not np.any(as_f32(q))


def moe_layer(impl, **scales):
    return lambda *a: w4.moe(*a, precision=HIGHEST, implementation=impl, **scales)


def assert_layer_matches(impl, x, ids, tw, w13, w2, **scales):
    """The layer at static scales with tests/test_moe.py's derived bounds: the reference path
    against the float64 model's layer, the CUDA path (HIGHEST) against the reference path on the
    CPU (normwise 5e-3; float64 norms, the outputs may be ~1e-36)."""
    got = jax.jit(moe_layer(impl, **scales))(x, ids, tw, w13, w2)
    assert np.isfinite(as_f32(got)).all()
    if impl == "reference":
        weights = [np.asarray(a) for a in (w13.packed, w13.scales, w2.packed, w2.scales)]
        assert_moe_close(got, Model(np.asarray(x), np.asarray(ids), np.asarray(tw), *weights, **scales))
        return
    want = as_f32(reference_on_cpu(moe_layer("reference", **scales), x, ids, tw, w13, w2)).astype(np.float64)
    assert np.linalg.norm(as_f32(got).astype(np.float64) - want) <= 5e-3 * np.linalg.norm(want)


@pytest.mark.parametrize("impl", EVERY_IMPLEMENTATION)
@pytest.mark.parametrize("a1", [TINY, 0.02])
def test_moe_with_smallest_scales_is_finite(rng, impl, a1):
    """Scales of 2**-126 on an input with zeros (the issue's all-NaN case used 1e-39): nonzero
    activations saturate, zeros stay zero (0 / scale = 0), the output is finite and matches the
    model. With a1 = 2**-126 too, c1 is ~1e-37 and h = silu(g) * u underflows to 0: zeros.

    Bound (a1 = 0.02): every |h| > 448 * 2^-126 saturates, so q2 = +-448 on both sides (a code
    could differ only for an h within 6e-36 of zero); c2 and out then differ from the model only
    where an f32 sum rounds to the other bf16 neighbour than the float64 one (one ulp, <= 2^-7
    relative, for a small fraction p of the elements: ~sqrt(p) 2^-7 < 1e-3 normwise) and, on the
    CPU, by outputs below 2^-126 flushed to zero (the output RMS is 100-140 x 2^-126, so each is
    off by < 1e-2 RMS: 1e-2 sqrt(share) normwise, 1.3e-3 at the 1.2-1.6% measured). Measured
    1.1e-3 to 2.1e-3; bound 1e-2. A wrong scale or saturation gives O(1)."""
    w13, w2 = layer_weights(rng)
    x, ids, tw = tokens(rng, 5)
    x = x.at[:, ::2].set(0)
    got = as_f32(jax.jit(moe_layer(impl, a1_scale=a1, a2_scale=TINY))(x, ids, tw, w13, w2))
    assert np.isfinite(got).all()
    want = ref.moe(np.asarray(x), np.asarray(ids), np.asarray(tw), np.asarray(w13.packed), np.asarray(w13.scales),
                   np.asarray(w2.packed), np.asarray(w2.scales), a1_scale=a1, a2_scale=TINY).astype(np.float32)
    if a1 == TINY:
        assert not np.any(want) and not np.any(got)
    else:
        assert np.any(want)
        got, want = got.astype(np.float64), want.astype(np.float64)  # ~1e-36: f32 squares would underflow
        rel = np.linalg.norm(got - want) / np.linalg.norm(want)
        assert rel < 1e-2, rel


# ---------------------------------------------------------------------------------------------
# 4. Host (NumPy) arrays of activations
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", EVERY_IMPLEMENTATION)
@pytest.mark.parametrize("jit", JIT)
def test_host_arrays_work_like_device_arrays(rng, impl, jit):
    """Every step and the layer give the same bits with host (NumPy) arguments as with device
    arrays, eagerly and closed over under jit. Under jit both are compared closed over: XLA folds
    a computation of constants at compile time, in its own summation order (seed 308633591: the
    jitted combine of host constants was one bf16 ulp off the eager device run in 1 of 1280
    elements), so like is compared with like."""
    w13, w2 = layer_weights(rng)
    x, ids, tw = tokens(rng, 5, k=3, drop=True)
    x_np, tw_np = np.asarray(x), np.asarray(tw)                    # ml_dtypes bfloat16, float32
    ids_np = np.asarray(ids).astype(np.int64)
    ids_np[ids_np == -1] = 2**32 + 1                               # 64-bit: dropped, not expert 1

    def on_both(step, device_args, host_args):
        """(step on the host arguments, step on the device ones), each closed over under jit."""
        return [jax.device_get(maybe_jit(lambda: step(*args), jit)()) for args in (host_args, device_args)]

    host, device = on_both(lambda *a: w4.moe(*a, w13, w2, implementation=impl, a1_scale=0.02, a2_scale=0.01),
                           (x, ids, tw), (x_np, ids_np, tw_np))
    np.testing.assert_array_equal(as_f32(host), as_f32(device))
    r_host, r = on_both(lambda i: w4.route(i, E, implementation=impl), (ids,), (ids_np,))
    for a, b in zip(r, r_host):
        np.testing.assert_array_equal(a, b)
    pos, off = r.positions, r.group_offsets
    kept = int(off[-1])
    (q1_host, s1_host), (q1, s1) = on_both(lambda x_, p: w4.gather_quantize(x_, p, 0.02, implementation=impl),
                                           (x, jnp.asarray(pos)), (x_np, pos))
    np.testing.assert_array_equal(fp8_bytes(q1_host)[:kept], fp8_bytes(q1)[:kept])
    assert float(s1_host) == float(s1)
    c1_host, c1 = on_both(lambda q, o: w4.grouped_gemm(q, np.float32(s1), w13, o, implementation=impl),
                          (jnp.asarray(q1), jnp.asarray(off)), (q1, off))
    np.testing.assert_array_equal(as_f32(c1_host), as_f32(c1))
    (q2_host, _), (q2, _) = on_both(lambda c, o: w4.silu_mul_quantize(c, o, 0.01, implementation=impl),
                                    (jnp.asarray(c1), jnp.asarray(off)), (c1, off))
    np.testing.assert_array_equal(fp8_bytes(q2_host)[:kept], fp8_bytes(q2)[:kept])
    out_host, out = on_both(lambda c, p, t: w4.combine(c[:, :H], p, t, 2.5, implementation=impl),
                            (jnp.asarray(c1), jnp.asarray(pos), tw), (c1, pos, tw_np))
    np.testing.assert_array_equal(as_f32(out_host), as_f32(out))


# ---------------------------------------------------------------------------------------------
# 7. Adversarial indices: a documented result, no out-of-bounds access
# ---------------------------------------------------------------------------------------------
R = 12
BAD_OFFSETS = {
    "non_monotonic": [0, 7, 3, 9, 5],
    "negative": [-5, -1, 4, -3, 8],
    "beyond_R": [0, 3, 50, 100, 2**31 - 1],
    "all_equal": [4, 4, 4, 4, 4],
    "all_zero": [0, 0, 0, 0, 0],
    "starts_late": [3, 5, 8, 9, 10],
    "int32_extremes": [-(2**31), 2**31 - 1, 5, -(2**31), 12],
    "last_negative": [0, 3, 5, 7, -4],
    "valid": [0, 2, 2, 7, 12],
}


def ordered(offsets, num_rows):
    """docs/numerics.md: clip into [0, R], then a running maximum."""
    return np.maximum.accumulate(np.clip(np.asarray(offsets, np.int64), 0, num_rows))


@pytest.mark.parametrize("impl", EVERY_IMPLEMENTATION)
@pytest.mark.parametrize("case", list(BAD_OFFSETS))
def test_grouped_gemm_any_group_offsets(rng, impl, case):
    w13, _ = layer_weights(rng)
    lhs, lhs_scale = ref.quantize_fp8(rng.standard_normal((R, H)))
    offsets = jnp.asarray(BAD_OFFSETS[case], jnp.int32)
    fn = jax.jit(lambda l, o: w4.grouped_gemm(l, lhs_scale, w13, o, precision=HIGHEST, implementation=impl))
    got = as_f32(run_poisoned(fn, jnp.asarray(lhs), offsets))
    o = ordered(BAD_OFFSETS[case], R)
    want = ref.grouped_gemm(lhs, lhs_scale, np.asarray(w13.packed), np.asarray(w13.scales), o, 128)
    owned = (np.arange(R) >= o[0]) & (np.arange(R) < o[-1])
    assert not np.any(got[~owned]), "rows no expert owns must be zero"
    assert np.isfinite(got).all()
    if owned.any():
        assert np.mean(bf16_ulps(got[owned], want[owned]) <= 1) >= 0.999
    again = as_f32(fn(jnp.asarray(lhs), offsets))
    np.testing.assert_array_equal(again, got)  # bitwise repeatable


@pytest.mark.parametrize("impl", EVERY_IMPLEMENTATION)
@pytest.mark.parametrize("case", list(BAD_OFFSETS))
def test_silu_mul_quantize_any_group_offsets(rng, impl, case):
    """Only group_offsets[E] is read: rows r < group_offsets[E] are computed."""
    c1 = jnp.asarray(rng.standard_normal((R, 2 * I)), BF16)
    offsets = jnp.asarray(BAD_OFFSETS[case], jnp.int32)
    kept = int(np.clip(BAD_OFFSETS[case][-1], 0, R))
    fn = jax.jit(lambda c, o: w4.silu_mul_quantize(c, o, implementation=impl))
    q, s = fn(c1, offsets)
    want_q, want_s = reference_on_cpu(lambda c, o: w4.silu_mul_quantize(c, o, implementation="reference"),
                                      c1, offsets)
    h = ref.silu_mul(np.asarray(c1))[:kept]
    model_s = ref.dynamic_scale(h)
    np.testing.assert_allclose(float(s), model_s, rtol=1e-6)
    np.testing.assert_allclose(float(want_s), model_s, rtol=1e-6)
    assert not np.any(as_f32(want_q)[kept:])  # the reference's unkept rows are zero
    assert_fp8_close(fp8_bytes(q)[:kept], fp8_bytes(want_q)[:kept])
    np.testing.assert_array_equal(fp8_bytes(fn(c1, offsets)[0])[:kept], fp8_bytes(q)[:kept])


@pytest.mark.parametrize("impl", EVERY_IMPLEMENTATION)
def test_gather_quantize_positions_outside_the_rows(rng, impl):
    """Positions outside [0, M*k) write nothing; every other row holds its token."""
    m, k = 5, 3
    x = jnp.asarray(rng.standard_normal((m, H)), BF16)
    pos = rng.permutation(m * k).reshape(m, k).astype(np.int64)
    bad = rng.random((m, k)) < 0.4
    pos[bad] = rng.choice([-1, -(2**31), m * k, m * k + 7, 2**31 - 1], size=int(bad.sum()))
    pos = jnp.asarray(pos.astype(np.int32))
    q, s = jax.jit(lambda x, p: w4.gather_quantize(x, p, 0.01, implementation=impl))(x, pos)
    want, _ = ref.quantize_fp8(np.asarray(x), 0.01)
    written = np.zeros(m * k, bool)
    for t in range(m):
        for j in range(k):
            p = int(pos[t, j])
            if 0 <= p < m * k:
                written[p] = True
                np.testing.assert_array_equal(fp8_bytes(q)[p], fp8_bytes(want)[t])
    if impl == "reference":  # rows no slot writes: zero on the reference path, unspecified on CUDA
        assert not np.any(as_f32(q)[~written])


@pytest.mark.parametrize("impl", EVERY_IMPLEMENTATION)
@pytest.mark.parametrize("jit", JIT)
def test_route_and_moe_with_any_topk_ids(rng, impl, jit):
    """ids outside [0, E), of any value, are dropped slots: the routing equals the model's and the
    layer equals the model's layer (which skips them)."""
    w13, w2 = layer_weights(rng)
    m, k = 7, 3
    x, ids, tw = tokens(rng, m, k)
    ids = np.asarray(ids).copy()
    wild = rng.random((m, k)) < 0.4
    ids[wild] = rng.choice([-1, -(2**31), E, E + 1, 2**31 - 1], size=int(wild.sum()))
    ids = jnp.asarray(ids)
    r = maybe_jit(lambda i: w4.route(i, E, implementation=impl), jit)(ids)
    counts, offsets, positions = ref.route(np.asarray(ids), E)
    np.testing.assert_array_equal(np.asarray(r.rows_per_expert), counts)
    np.testing.assert_array_equal(np.asarray(r.group_offsets), offsets)
    np.testing.assert_array_equal(np.asarray(r.positions), positions)
    assert_layer_matches(impl, x, ids, tw, w13, w2, a1_scale=0.02, a2_scale=0.01)


# ---------------------------------------------------------------------------------------------
# Bitwise repeatability: eager, jit, and (CUDA) inside XLA command buffers
# ---------------------------------------------------------------------------------------------
def repeat_problem(seed):
    """A layer problem with no dropped slots (so every row of every step is specified)."""
    rng = np.random.default_rng(seed)
    w13, w2 = layer_weights(rng)
    x, ids, tw = tokens(rng, 9, k=3)
    return x, ids, tw, w13, w2


def every_step(x, ids, tw, w13, w2, *, impl, static):
    """Every public op on one problem: a dict of outputs as raw bits (uint arrays)."""
    a1, a2 = (0.02, 0.01) if static else (None, None)
    r = w4.route(ids, E, implementation=impl)
    q1, s1 = w4.gather_quantize(x, r.positions, a1, implementation=impl)
    c1 = w4.grouped_gemm(q1, s1, w13, r.group_offsets, implementation=impl)
    q2, s2 = w4.silu_mul_quantize(c1, r.group_offsets, a2, implementation=impl)
    c2 = w4.grouped_gemm(q2, s2, w2, r.group_offsets, implementation=impl)
    out = w4.combine(c2, r.positions, tw, 2.5, implementation=impl)
    layer = w4.moe(x, ids, tw, w13, w2, a1_scale=a1, a2_scale=a2, routed_scaling_factor=2.5, implementation=impl)
    bits = lambda a: jax.lax.bitcast_convert_type(a, {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[a.dtype.itemsize])  # noqa: E731
    return dict(rows=r.rows_per_expert, offsets=r.group_offsets, positions=r.positions, q1=bits(q1), s1=bits(s1),
                c1=bits(c1), q2=bits(q2), s2=bits(s2), c2=bits(c2), out=bits(out), layer=bits(layer))


def assert_same_bits(a, b, what):
    for name in a:
        np.testing.assert_array_equal(np.asarray(a[name]), np.asarray(b[name]), err_msg=f"{what}: {name}")


@pytest.mark.parametrize("impl", EVERY_IMPLEMENTATION)
@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_repeated_runs_bitwise_identical(rng, impl, static):
    problem = repeat_problem(int(rng.integers(2**31)))
    run = lambda *p: every_step(*p, impl=impl, static=static)  # noqa: E731
    eager = run(*problem)
    assert_same_bits(eager, run(*problem), "eager twice")
    jitted = jax.jit(run)
    first = jitted(*problem)
    assert_same_bits(first, jitted(*problem), "jit twice")
    if static or impl == "reference":  # on the GPU, XLA's divisions round differently in fused code
        assert_same_bits(eager, first, "eager against jit")


COMMAND_BUFFER_FLAGS = " --xla_gpu_enable_command_buffer=FUSION,CUSTOM_CALL --xla_gpu_graph_min_graph_size=1"


def command_buffer_main(seed: int, path: str) -> None:
    """Run in a subprocess with XLA command buffers forced on: every step, jitted, three times
    (one executable, replayed), checked identical and saved for the parent to compare."""
    problem = repeat_problem(seed)
    for static in (False, True):
        fn = jax.jit(lambda *p: every_step(*p, impl="cuda", static=static))
        runs = [jax.device_get(fn(*problem)) for _ in range(3)]
        for again in runs[1:]:
            assert_same_bits(runs[0], again, "command buffer replay")
        np.savez(f"{path}.{'static' if static else 'dynamic'}.npz", **runs[0])


@pytest.mark.gpu
def test_repeated_runs_bitwise_identical_in_command_buffers(rng, tmp_path):
    seed = int(rng.integers(2**31))
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + COMMAND_BUFFER_FLAGS).strip()
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    script = (f"import sys; sys.path.insert(0, {tests_dir!r}); import test_edge_cases as t; "
              f"t.command_buffer_main({seed}, {str(tmp_path / 'bits')!r}); print('GRAPH_OK')")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "GRAPH_OK" in result.stdout, result.stdout + result.stderr[-3000:]
    problem = repeat_problem(seed)
    # Static scales: the same bits as this process's eager and jitted runs (no command buffers).
    saved = dict(np.load(tmp_path / "bits.static.npz"))
    assert_same_bits(saved, jax.device_get(every_step(*problem, impl="cuda", static=True)), "graph against eager")
    # Dynamic scales: the same bits as a jitted run without command buffers.
    saved = dict(np.load(tmp_path / "bits.dynamic.npz"))
    want = jax.jit(lambda *p: every_step(*p, impl="cuda", static=False))(*problem)
    assert_same_bits(saved, jax.device_get(want), "graph against jit")
