"""Property-based tests (hypothesis) of the public API on the reference path: its argument
validation, and its numerics against the float64 model (tests/numpy_model.py) over shapes,
dtypes, group sizes and routing patterns (empty batches, a hot expert, dropped slots, duplicate
experts in one token, ids of any value), with arbitrary group offsets and positions.

Bounds are the arithmetic ones (derived per test), so no example can fail by chance. Example
counts are small and the shapes come from short lists so compiled shapes repeat (CI time).
"""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import numpy_model as ref
import w4afp8_jax as w4
from helpers import Model, assert_moe_close

SETTINGS = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TINY = float(np.finfo(np.float32).tiny)
PATTERNS = ("uniform", "hot", "dropped", "duplicate", "wild")

seeds = st.integers(0, 2**32 - 1)
tokens_st = st.sampled_from([0, 1, 3, 8])
topk_st = st.sampled_from([0, 1, 2, 4])
experts_st = st.sampled_from([1, 3, 8])


@pytest.fixture(autouse=True, scope="module")
def _on_the_cpu():
    """The reference path defines the numerics on the CPU."""
    with jax.default_device(jax.devices("cpu")[0]):
        yield


def routing_ids(rng, m, k, e, pattern):
    """int32 ids [m, k] following a routing pattern."""
    if pattern == "hot":  # one expert takes almost everything
        ids = np.where(rng.random((m, k)) < 0.9, rng.integers(0, e), rng.integers(0, e, size=(m, k)))
    elif pattern == "duplicate":  # a token may name one expert in several slots
        ids = rng.integers(0, min(e, 2), size=(m, k))
    else:
        ids = rng.integers(0, e, size=(m, k))
    if pattern in ("dropped", "wild"):
        bad = rng.random((m, k)) < 0.4
        values = [-1, e] if pattern == "dropped" else [-1, -(2**31), e, e + 7, 2**31 - 1]
        ids = np.where(bad, rng.choice(values, size=(m, k)), ids)
    return ids.astype(np.int32)


# ---------------------------------------------------------------------------------------------
# Routing, quantization, gather
# ---------------------------------------------------------------------------------------------
@SETTINGS
@given(m=tokens_st, k=topk_st, e=experts_st, pattern=st.sampled_from(PATTERNS), seed=seeds)
def test_route_matches_model(m, k, e, pattern, seed):
    ids = routing_ids(np.random.default_rng(seed), m, k, e, pattern)
    got = w4.route(jnp.asarray(ids), e, implementation="reference")
    counts, offsets, positions = ref.route(ids, e)
    np.testing.assert_array_equal(np.asarray(got.rows_per_expert), counts)
    np.testing.assert_array_equal(np.asarray(got.group_offsets), offsets)
    np.testing.assert_array_equal(np.asarray(got.positions), positions)
    kept = np.asarray(got.positions)[np.asarray(got.positions) >= 0]
    assert sorted(kept.tolist()) == list(range(int(offsets[-1])))  # a permutation of the kept rows


def activations(rng, shape, dtype):
    """Values over many binades with zeros, +-inf and NaN mixed in; no subnormals (the CPU reads
    them as zero, the model does not: docs/numerics.md, "Scale range")."""
    x = rng.standard_normal(shape) * np.exp(rng.uniform(-20, 20, size=shape))
    special = rng.random(shape)
    x = np.where(special < 0.05, 0.0, x)
    x = np.where((special > 0.05) & (special < 0.08), rng.choice([np.inf, -np.inf, np.nan], size=shape), x)
    with np.errstate(over="ignore"):  # beyond the dtype's range: inf, like the specials
        x = x.astype(dtype)
    x[np.abs(x.astype(np.float32)) < TINY] = 0  # also what rounds to a subnormal in dtype
    return x


@SETTINGS
@given(shape=st.sampled_from([(0,), (1,), (7,), (3, 5), (4, 64)]),
       dtype=st.sampled_from([np.float32, ml_dtypes.bfloat16, np.float16]),
       log2_scale=st.one_of(st.none(), st.floats(-100, 100)), seed=seeds)
def test_quantize_fp8_matches_model(shape, dtype, log2_scale, seed):
    x = activations(np.random.default_rng(seed), shape, dtype)
    scale = None if log2_scale is None else float(2.0**log2_scale)
    q, s = w4.quantize_fp8(jnp.asarray(x), scale)
    want_q, want_s = ref.quantize_fp8(x, scale)
    assert s.dtype == jnp.float32 and float(s) == want_s
    assert np.isfinite(float(s)) and float(s) >= TINY
    got, want = np.asarray(q), np.asarray(want_q)
    nan = np.isnan(want.astype(np.float32))
    np.testing.assert_array_equal(np.isnan(got.astype(np.float32)), nan)  # NaN only where x is NaN
    np.testing.assert_array_equal(nan, np.isnan(x.astype(np.float32)))
    np.testing.assert_array_equal(got.view(np.uint8)[~nan], want.view(np.uint8)[~nan])


@SETTINGS
@given(m=tokens_st, k=topk_st, pattern=st.sampled_from(PATTERNS), static=st.booleans(), seed=seeds)
def test_gather_quantize_matches_model(m, k, pattern, static, seed):
    rng = np.random.default_rng(seed)
    e, h = 3, 32
    _, offsets, positions = ref.route(routing_ids(rng, m, k, e, pattern), e)
    x = activations(rng, (m, h), ml_dtypes.bfloat16)
    scale = float(np.exp(rng.uniform(-5, 5))) if static else None
    q, s = w4.gather_quantize(jnp.asarray(x), jnp.asarray(positions.astype(np.int32)), scale,
                              implementation="reference")
    want_q, want_s = ref.quantize_fp8(x, scale)
    assert q.shape == (m * k, h) and float(s) == want_s
    expected = np.zeros((m * k, h), ref.FP8)
    for t, j in zip(*np.nonzero(positions >= 0)):
        expected[positions[t, j]] = want_q[t]
    got = np.asarray(q)
    nan = np.isnan(expected.astype(np.float32))  # NaN stays NaN (its sign bit is not specified)
    np.testing.assert_array_equal(np.isnan(got.astype(np.float32)), nan)
    np.testing.assert_array_equal(got.view(np.uint8)[~nan], expected.view(np.uint8)[~nan])


# ---------------------------------------------------------------------------------------------
# Grouped GEMM, SiLU, combine
# ---------------------------------------------------------------------------------------------
@SETTINGS
@given(rows=st.sampled_from([0, 1, 5, 16]), e=st.sampled_from([1, 2, 5]), n=st.sampled_from([16, 32]),
       k_gs=st.sampled_from([(128, 128), (256, 128), (128, 32), (64, 64)]), ordered=st.booleans(), seed=seeds)
def test_grouped_gemm_matches_model(rows, e, n, k_gs, ordered, seed):
    """Any offsets (clipped into [0, R], running maximum). Bound, per element (as in
    tests/test_grouped_gemm.py): |got - S| <= 2^-8 (|S| + d) + d, d = (K + G + 2) 2^-24 A,
    with S the float64 result and A the same sum over |terms|."""
    rng = np.random.default_rng(seed)
    k, gs = k_gs
    packed = rng.integers(0, 256, size=(e, n, k // 2), dtype=np.uint8)
    scales = (rng.standard_normal((e, n, k // gs)) * 0.005).astype(np.float32)
    lhs, lhs_scale = ref.quantize_fp8(rng.standard_normal((rows, k)) * np.exp(rng.uniform(-3, 3)))
    if ordered:
        offsets = np.concatenate([[0], np.sort(rng.integers(0, rows + 1, size=e))])
    else:
        offsets = rng.integers(-3, rows + 4, size=e + 1)
    got = w4.grouped_gemm(jnp.asarray(lhs), lhs_scale, w4.W4Weights(jnp.asarray(packed), jnp.asarray(scales), gs),
                          jnp.asarray(offsets.astype(np.int32)), implementation="reference")
    assert got.shape == (rows, n) and got.dtype == jnp.bfloat16
    o = np.maximum.accumulate(np.clip(offsets, 0, rows))
    want, total = ref.grouped_gemm(lhs, lhs_scale, packed, scales, o, gs, with_abs=True)
    d = (k + k // gs + 2) * 2.0**-24 * total
    err = np.abs(np.asarray(got.astype(jnp.float32), np.float64) - want)
    assert np.all(err <= 2.0**-8 * (np.abs(want) + d) + d)


@SETTINGS
@given(rows=st.sampled_from([0, 1, 6, 16]), inter=st.sampled_from([16, 48]), last=st.integers(-3, 20),
       static=st.booleans(), seed=seeds)
def test_silu_mul_quantize_matches_model(rows, inter, last, static, seed):
    """Rows r < group_offsets[E] only. h is f32 math with XLA's exp on one side and float64 on
    the other: a few f32 ulps apart, so the scale agrees to 1e-6 and a code may move by one
    where h / scale is that close to a rounding midpoint."""
    rng = np.random.default_rng(seed)
    c1 = (rng.standard_normal((rows, 2 * inter)) * np.exp(rng.uniform(-2, 2))).astype(ml_dtypes.bfloat16)
    offsets = np.array([0, 0, last], np.int32)
    scale = float(np.exp(rng.uniform(-5, 0))) if static else None
    q, s = w4.silu_mul_quantize(jnp.asarray(c1), jnp.asarray(offsets), scale, implementation="reference")
    kept = int(np.clip(last, 0, rows))
    h = ref.silu_mul(c1)[:kept]
    want_s = np.float32(scale) if static else ref.dynamic_scale(h)
    np.testing.assert_allclose(float(s), want_s, rtol=1e-6)
    got = np.asarray(q)
    assert got.shape == (rows, inter) and not np.any(got[kept:].astype(np.float32))
    step = ref.fp8_ordinal(got[:kept]) - ref.fp8_ordinal(ref.to_fp8(h / np.float64(s)))
    assert np.all(np.abs(step) <= 1)


@SETTINGS
@given(m=tokens_st, k=topk_st, rows=st.sampled_from([0, 1, 7]),
       rsf=st.one_of(st.just(0.0), st.floats(0.125, 4), st.floats(-4, -0.125)), seed=seeds)
def test_combine_matches_model(m, k, rows, rsf, seed):
    """Positions of any value (outside [0, R): dropped), repeats allowed. Bound: the f32 sum of
    k + 1 products and the bf16 rounding, |got - S| <= 2^-8 |S| + (k + 2) 2^-23 A."""
    rng = np.random.default_rng(seed)
    h = 32
    table = (rng.standard_normal((rows, h))).astype(ml_dtypes.bfloat16)
    pos = rng.integers(-2, rows + 3, size=(m, k)).astype(np.int32)
    tw = rng.standard_normal((m, k)).astype(np.float32)
    got = w4.combine(jnp.asarray(table), jnp.asarray(pos), jnp.asarray(tw), rsf, implementation="reference")
    assert got.shape == (m, h) and got.dtype == jnp.bfloat16
    kept = np.where((pos >= 0) & (pos < rows), pos, -1)
    want = ref.combine(table, kept, tw, rsf, rounded=False)
    total = ref.combine(np.abs(table.astype(np.float64)), kept, np.abs(tw), abs(rsf), rounded=False)
    err = np.abs(np.asarray(got.astype(jnp.float32), np.float64) - want)
    assert np.all(err <= 2.0**-8 * np.abs(want) + (k + 2) * 2.0**-23 * total)


# ---------------------------------------------------------------------------------------------
# The layer
# ---------------------------------------------------------------------------------------------
H, I = 128, 128


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(m=st.sampled_from([0, 1, 5]), k=st.sampled_from([0, 1, 3]), e=st.sampled_from([1, 4]),
       pattern=st.sampled_from(PATTERNS), static=st.booleans(), seed=seeds)
def test_moe_matches_model(m, k, e, pattern, static, seed):
    """Against the model's layer with its roundings, with tests/test_moe.py's bounds (each token's
    row matches the model's, or the model's with one q2 code at its other rounding: an f32-order
    flip of a bf16 c1 value can move one; an all-zero result must be exactly zero)."""
    rng = np.random.default_rng(seed)
    p13, s13 = rng.integers(0, 256, (e, 2 * I, H // 2), dtype=np.uint8), (rng.standard_normal((e, 2 * I, 1)) * 0.005)
    p2, s2 = rng.integers(0, 256, (e, H, I // 2), dtype=np.uint8), (rng.standard_normal((e, H, 1)) * 0.005)
    s13, s2 = s13.astype(np.float32), s2.astype(np.float32)
    x = rng.standard_normal((m, H)).astype(ml_dtypes.bfloat16)
    ids = routing_ids(rng, m, k, e, pattern)
    tw = rng.random((m, k)).astype(np.float32)
    scales = dict(a1_scale=0.02, a2_scale=0.01) if static else {}
    got = jax.jit(lambda *a: w4.moe(*a, routed_scaling_factor=2.5, implementation="reference", **scales))(
        x, ids, tw, w4.W4Weights(p13, s13), w4.W4Weights(p2, s2))
    assert got.shape == (m, H) and got.dtype == jnp.bfloat16
    assert_moe_close(got, Model(x, ids, tw, p13, s13, p2, s2, routed_scaling_factor=2.5, **scales))


# ---------------------------------------------------------------------------------------------
# Validation: one bad argument in an otherwise valid call names that argument
# ---------------------------------------------------------------------------------------------
def pick(rng, values):
    return values[rng.integers(len(values))]


MUTATIONS = [
    ("x", lambda a, r: a["x"][:, 0]), ("x", lambda a, r: a["x"][None]), ("x", lambda a, r: a["x"].astype(np.int32)),
    ("x", lambda a, r: np.zeros((a["x"].shape[0], H + 128), ml_dtypes.bfloat16)),
    ("topk_ids", lambda a, r: a["topk_ids"].astype(np.float32)), ("topk_ids", lambda a, r: a["topk_ids"][:, 0]),
    ("topk_ids", lambda a, r: np.zeros((a["x"].shape[0] + 1, 2), np.int32)),
    ("topk_weights", lambda a, r: a["topk_weights"].astype(np.int32)),
    ("topk_weights", lambda a, r: a["topk_weights"][:, :1]),
    ("a1_scale", lambda a, r: pick(r, [0.0, -1.0, np.nan, np.inf, 1e-39, 1e39, "0.1"])),
    ("a2_scale", lambda a, r: pick(r, [0.0, -1.0, np.nan, np.inf, 1e-40, 1e-50, [0.1, 0.2]])),
    ("routed_scaling_factor", lambda a, r: pick(r, [np.nan, np.inf, "abc", None])),
    ("precision", lambda a, r: pick(r, ["fast", 3.5, (jax.lax.Precision.DEFAULT, jax.lax.Precision.HIGHEST)])),
    ("implementation", lambda a, r: pick(r, ["gpu", "CUDA", "", None])),
]


@SETTINGS
@given(m=st.sampled_from([0, 2, 3]), which=st.integers(0, len(MUTATIONS) - 1), seed=seeds)
def test_one_bad_argument_is_named(m, which, seed):
    rng = np.random.default_rng(seed)
    e = 2
    w13 = w4.W4Weights(np.zeros((e, 2 * I, H // 2), np.uint8), np.ones((e, 2 * I, 1), np.float32))
    w2 = w4.W4Weights(np.zeros((e, H, I // 2), np.uint8), np.ones((e, H, 1), np.float32))
    args = dict(x=np.zeros((m, H), ml_dtypes.bfloat16), topk_ids=np.zeros((m, 2), np.int32),
                topk_weights=np.zeros((m, 2), np.float32), a1_scale=None, a2_scale=None, routed_scaling_factor=1.0,
                precision=None, implementation="reference")
    name, mutate = MUTATIONS[which]
    args[name] = mutate(args, rng)
    with pytest.raises((ValueError, TypeError), match=rf"\b{name}\b"):
        w4.moe(args.pop("x"), args.pop("topk_ids"), args.pop("topk_weights"), w13, w2, **args)
