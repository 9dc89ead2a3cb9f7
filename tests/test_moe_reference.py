"""The MoE layer's reference path (steps 1-6) and its steps 2, 4 and 6 against the NumPy model.

How close the end-to-end result must be. The model reproduces every rounding of the spec
(fp8 q1, bf16 c1, fp8 q2, bf16 c2, bf16 out) with the same scales, so the only differences
come from the reference accumulating in f32 where the model uses float64. Those move a bf16
c1 / c2 value by one bf16 ulp when the exact value lies within the f32 error of a rounding
boundary (rare: ~1e-4 of the elements), and a changed c1 can move one q2 element by one fp8
ulp (2^-4..2^-3 relative). One such q2 change perturbs a whole c2 row by about
|dq| / (8 sqrt(I)) of its norm, i.e. a fraction of a percent, and the token's output row by
less. Hence, on the bf16 outputs:
  - ||out - model|| / ||model|| < 1e-2 (a few intermediate flips stay far below this);
  - every element within rtol 1e-2 plus atol 5% of the output's rms (the seed's rtol 1e-2 /
    atol 0.1, scaled to these outputs; a single fp8 flip moves an element by ~1e-3 here);
  - >= 98% of the elements within one bf16 ulp of the model (without any flip: all of them).
"""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import numpy_model as ref
import w4afp8_jax as w4

R = "reference"


def make_weights(rng, e, h, inter, gs=128):
    p13 = rng.integers(0, 256, size=(e, 2 * inter, h // 2), dtype=np.uint8)
    s13 = (rng.standard_normal((e, 2 * inter, h // gs)) * 0.005).astype(np.float32)
    p2 = rng.integers(0, 256, size=(e, h, inter // 2), dtype=np.uint8)
    s2 = (rng.standard_normal((e, h, inter // gs)) * 0.005).astype(np.float32)
    return p13, s13, p2, s2


def make_tokens(rng, m, h, e, k, distinct=True):
    x = rng.standard_normal((m, h)).astype(ml_dtypes.bfloat16)
    if distinct:
        ids = np.stack([rng.choice(e, k, replace=False) for _ in range(m)])
    else:
        ids = rng.integers(0, e, size=(m, k))
    weights = rng.random((m, k)).astype(np.float32) + 0.05
    weights /= weights.sum(axis=1, keepdims=True)
    return x, ids.astype(np.int32), weights


def assert_moe_close(got, want, seed_note=""):
    got = np.asarray(got)
    assert got.dtype == ref.BF16 and got.shape == want.shape
    g, w = got.astype(np.float64), want.astype(np.float64)
    assert np.all(np.isfinite(g))
    norm = np.linalg.norm(w)
    if norm == 0:
        assert np.all(g == 0)
        return
    rel = np.linalg.norm(g - w) / norm
    assert rel < 1e-2, f"relative norm error {rel} {seed_note}"
    rms = np.sqrt(np.mean(w**2))
    np.testing.assert_allclose(g, w, rtol=1e-2, atol=0.05 * rms, err_msg=seed_note)
    within = np.mean(np.abs(g - w) <= ref.bf16_ulp(w))
    assert within >= 0.98, f"only {within:.4f} of the elements within 1 bf16 ulp {seed_note}"


# ------------------------------------------------------------------------------------------
# Step 2: gather_quantize (exact)
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("static", [False, True])
def test_gather_quantize_exact(rng, static):
    m, k, h, e = 13, 4, 384, 8
    x = (rng.standard_normal((m, h)) * 3).astype(ml_dtypes.bfloat16)
    ids = rng.integers(-1, e + 1, size=(m, k)).astype(np.int32)  # with dropped slots
    _, offsets, positions = ref.route(ids, e)
    scale = float(np.abs(x.astype(np.float32)).max() / 448 * rng.uniform(0.3, 2.0)) if static else None
    q, s = w4.gather_quantize(jnp.asarray(x), jnp.asarray(positions, np.int32), scale, implementation=R)
    q_tok, want_s = ref.quantize_fp8(x, scale)
    assert np.float32(s) == want_s
    q = np.asarray(q)
    assert q.shape == (m * k, h) and q.dtype == ref.FP8
    for t in range(m):
        for j in range(k):
            if positions[t, j] >= 0:
                np.testing.assert_array_equal(q[positions[t, j]].view(np.uint8), q_tok[t].view(np.uint8))
    assert np.all(q[int(offsets[-1]):].astype(np.float32) == 0)  # unmapped rows: zero on the reference path


# ------------------------------------------------------------------------------------------
# Step 4: silu_mul_quantize (f32 math vs float64: at most one fp8 ulp, almost always exact)
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("static", [False, True])
def test_silu_mul_quantize(rng, static):
    rows, inter, e = 300, 512, 16
    c1 = (rng.standard_normal((rows, 2 * inter)) * 2).astype(ml_dtypes.bfloat16)
    counts = np.bincount(rng.integers(0, e, size=250), minlength=e)  # rows 250.. not kept
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    h = ref.silu_mul(c1[:250])
    scale = float(np.abs(h).max() / 448 * rng.uniform(0.3, 2.0)) if static else None
    q, s = w4.silu_mul_quantize(jnp.asarray(c1), jnp.asarray(offsets), scale, implementation=R)
    want, want_s = ref.quantize_fp8(h, scale)
    # Dynamic: amax of the f32 h / 448; f32 exp / divide differ from float64 by a few f32 ulps.
    np.testing.assert_allclose(float(s), float(want_s), rtol=1e-6)
    q = np.asarray(q)
    assert q.shape == (rows, inter)
    diff = np.abs(ref.fp8_ordinal(q[:250]) - ref.fp8_ordinal(want))
    # A flip needs the f32 quotient within a few f32 ulps (~1e-7 relative) of an fp8 midpoint.
    assert diff.max() <= 1 and np.mean(diff == 0) >= 0.999
    assert np.all(q[250:].astype(np.float32) == 0)


# ------------------------------------------------------------------------------------------
# Step 6: combine (f32 accumulation of bf16 rows, one bf16 rounding)
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rsf", [1.0, 2.5])
def test_combine(rng, rsf):
    m, k, h, e = 20, 8, 512, 32
    ids = rng.integers(0, e + 2, size=(m, k)).astype(np.int32)  # ids >= e dropped
    _, _, positions = ref.route(ids, e)
    rows = rng.standard_normal((m * k, h)).astype(ml_dtypes.bfloat16)
    weights = rng.random((m, k)).astype(np.float32)
    got = np.asarray(w4.combine(jnp.asarray(rows), jnp.asarray(positions, np.int32), jnp.asarray(weights), rsf,
                                implementation=R)).astype(np.float64)
    exact = ref.combine(rows, positions, weights, rsf, rounded=False)
    absum = ref.combine(np.abs(rows.astype(np.float64)), positions, weights, rsf, rounded=False)
    # bf16 rounding (2^-8 relative) + f32 accumulation of <= k + 1 terms ((k + 2) 2^-24 of |terms|).
    d = (k + 2) * 2.0**-24 * absum
    assert np.all(np.abs(got - exact) <= 2.0**-8 * (np.abs(exact) + d) + d)
    assert np.mean(got == ref.combine(rows, positions, weights, rsf).astype(np.float64)) >= 0.99


# ------------------------------------------------------------------------------------------
# moe at small shapes
# ------------------------------------------------------------------------------------------
SMALL = [  # (E, H, I, group_size, k, M)
    (1, 128, 128, 128, 1, 3), (8, 256, 128, 128, 2, 5), (16, 384, 256, 128, 4, 33),
    (32, 192, 64, 64, 8, 17), (4, 256, 128, 128, 4, 1)]


@pytest.mark.parametrize("e,h,inter,gs,k,m", SMALL)
@pytest.mark.parametrize("static", [False, True])
def test_moe_small_matches_model(rng, e, h, inter, gs, k, m, static):
    p13, s13, p2, s2 = make_weights(rng, e, h, inter, gs)
    x, ids, weights = make_tokens(rng, m, h, e, k, distinct=(k <= e and m % 2 == 1))
    rsf = float(rng.uniform(0.5, 3.0))
    a1 = a2 = None
    if static:
        # Scales around the dynamic ones; a factor < 1 saturates the largest values.
        _, im = ref.moe(x, ids, weights, p13, s13, p2, s2, gs, routed_scaling_factor=rsf, return_intermediates=True)
        a1 = float(im["s1"] * rng.uniform(0.5, 2.0))
        a2 = float(im["s2"] * rng.uniform(0.5, 2.0))
    w13 = w4.W4Weights(jnp.asarray(p13), jnp.asarray(s13), gs)
    w2 = w4.W4Weights(jnp.asarray(p2), jnp.asarray(s2), gs)
    got = w4.moe(jnp.asarray(x), jnp.asarray(ids), jnp.asarray(weights), w13, w2, a1_scale=a1, a2_scale=a2,
                 routed_scaling_factor=rsf, implementation=R)
    want = ref.moe(x, ids, weights, p13, s13, p2, s2, gs, a1_scale=a1, a2_scale=a2, routed_scaling_factor=rsf)
    assert_moe_close(got, want)


def test_moe_equals_its_steps_and_jit(rng):
    e, h, inter, k, m = 16, 256, 128, 4, 9
    p13, s13, p2, s2 = make_weights(rng, e, h, inter)
    x, ids, weights = make_tokens(rng, m, h, e, k)
    ids[rng.random(ids.shape) < 0.2] = e  # expert-parallel drops
    w13, w2 = w4.W4Weights(jnp.asarray(p13), jnp.asarray(s13)), w4.W4Weights(jnp.asarray(p2), jnp.asarray(s2))
    args = (jnp.asarray(x), jnp.asarray(ids), jnp.asarray(weights), w13, w2)
    got = np.asarray(w4.moe(*args, routed_scaling_factor=2.5, implementation=R))
    # The same pipeline spelled out with the public steps: bit-identical.
    r = w4.route(args[1], e, implementation=R)
    q1, s1 = w4.gather_quantize(args[0], r.positions, implementation=R)
    c1 = w4.grouped_gemm(q1, s1, w13, r.group_offsets, implementation=R)
    q2, s2_ = w4.silu_mul_quantize(c1, r.group_offsets, implementation=R)
    c2 = w4.grouped_gemm(q2, s2_, w2, r.group_offsets, implementation=R)
    steps = np.asarray(w4.combine(c2, r.positions, args[2], 2.5, implementation=R))
    np.testing.assert_array_equal(got.view(np.uint16), steps.view(np.uint16))
    want = ref.moe(x, ids, weights, p13, s13, p2, s2, routed_scaling_factor=2.5)
    assert_moe_close(got, want)
    # Under jit, weights and (traced) static scales as arguments.
    fn = jax.jit(lambda *a, s1=None, s2=None: w4.moe(*a, a1_scale=s1, a2_scale=s2, routed_scaling_factor=2.5,
                                                       implementation=R))
    assert_moe_close(fn(*args), want)
    _, im = ref.moe(x, ids, weights, p13, s13, p2, s2, return_intermediates=True)
    a1, a2 = float(im["s1"] * 1.3), float(im["s2"] * 0.9)
    want_static = ref.moe(x, ids, weights, p13, s13, p2, s2, a1_scale=a1, a2_scale=a2, routed_scaling_factor=2.5)
    assert_moe_close(fn(*args, s1=jnp.float32(a1), s2=jnp.float32(a2)), want_static)


def test_moe_routed_scaling_factor_and_drops(rng):
    e, h, inter, k, m = 8, 256, 128, 4, 6
    p13, s13, p2, s2 = make_weights(rng, e, h, inter)
    x, ids, weights = make_tokens(rng, m, h, e, k)
    w13, w2 = w4.W4Weights(jnp.asarray(p13), jnp.asarray(s13)), w4.W4Weights(jnp.asarray(p2), jnp.asarray(s2))
    run = lambda i, rsf: np.asarray(w4.moe(jnp.asarray(x), jnp.asarray(i), jnp.asarray(weights), w13, w2,  # noqa: E731
                                           routed_scaling_factor=rsf, implementation=R)).astype(np.float32)
    base = run(ids, 1.0)
    # A power-of-two factor commutes with the final f32 multiply and bf16 rounding: exact.
    np.testing.assert_array_equal(run(ids, 4.0), 4.0 * base)
    assert_moe_close(run(ids, 2.5).astype(ref.BF16), ref.moe(x, ids, weights, p13, s13, p2, s2,
                                                             routed_scaling_factor=2.5))
    # Dropping slots (id = E, -1, huge) removes exactly their contribution.
    dropped = ids.copy()
    dropped[0, :] = e  # token 0 loses every expert: its row must be exactly zero
    dropped[1, 1], dropped[2, 3], dropped[3, 0] = -1, 2**31 - 1, e
    got = run(dropped, 2.5)
    assert np.all(got[0] == 0)
    assert_moe_close(got.astype(ref.BF16), ref.moe(x, dropped, weights, p13, s13, p2, s2, routed_scaling_factor=2.5))
    # All slots dropped: the output is exactly zero.
    assert np.all(run(np.full_like(ids, e), 2.5) == 0)


def test_moe_duplicate_experts_in_a_token(rng):
    # Nothing requires distinct ids per token: a repeated expert counts twice.
    e, h, inter, k, m = 4, 128, 128, 6, 5
    p13, s13, p2, s2 = make_weights(rng, e, h, inter)
    x, ids, weights = make_tokens(rng, m, h, e, k, distinct=False)
    ids[0] = ids[0, 0]  # token 0: one expert in every slot
    w13, w2 = w4.W4Weights(jnp.asarray(p13), jnp.asarray(s13)), w4.W4Weights(jnp.asarray(p2), jnp.asarray(s2))
    got = w4.moe(jnp.asarray(x), jnp.asarray(ids), jnp.asarray(weights), w13, w2, implementation=R)
    assert_moe_close(got, ref.moe(x, ids, weights, p13, s13, p2, s2))


# ------------------------------------------------------------------------------------------
# moe at DeepSeek-V3 TP4 shapes: E=256, H=7168, I=512, top-8
# ------------------------------------------------------------------------------------------
E_DS, H_DS, I_DS, K_DS = 256, 7168, 512, 8


@pytest.fixture(scope="module")
def deepseek_weights(module_rng):
    """Built once per module (1.4 GB of int4). The NumPy views share the JAX buffers."""
    seed, rng = module_rng
    p13, s13, p2, s2 = make_weights(rng, E_DS, H_DS, I_DS)
    w13 = w4.W4Weights(jnp.asarray(p13), jnp.asarray(s13))
    w2 = w4.W4Weights(jnp.asarray(p2), jnp.asarray(s2))
    del p13, p2
    np_views = (np.asarray(w13.packed), np.asarray(w13.scales), np.asarray(w2.packed), np.asarray(w2.scales))
    return seed, w13, w2, np_views


@pytest.mark.parametrize("m", [1, 3, 16, 64])
def test_moe_deepseek_shapes(rng, deepseek_weights, m):
    wseed, w13, w2, (p13, s13, p2, s2) = deepseek_weights
    assert p13.shape == (E_DS, 2 * I_DS, H_DS // 2) and p2.shape == (E_DS, H_DS, I_DS // 2)
    x, ids, weights = make_tokens(rng, m, H_DS, E_DS, K_DS)
    got = w4.moe(jnp.asarray(x), jnp.asarray(ids), jnp.asarray(weights), w13, w2,
                 routed_scaling_factor=2.5, implementation=R)
    want = ref.moe(x, ids, weights, p13, s13, p2, s2, routed_scaling_factor=2.5)  # only the experts hit
    assert_moe_close(got, want, f"(weights seed {wseed})")


def test_moe_deepseek_static_scales_drops_jit(rng, deepseek_weights):
    wseed, w13, w2, (p13, s13, p2, s2) = deepseek_weights
    m = 4
    x, ids, weights = make_tokens(rng, m, H_DS, E_DS, K_DS)
    ids[rng.random(ids.shape) < 0.25] = E_DS  # experts held by another GPU
    ids[1, 2] = -1
    a1 = float(np.abs(x.astype(np.float32)).max() / 448 * 0.8)  # largest activations saturate
    a2 = float(rng.uniform(0.03, 0.1))
    fn = jax.jit(lambda *a: w4.moe(*a, a1_scale=a1, a2_scale=a2, routed_scaling_factor=2.5, implementation=R))
    got = fn(jnp.asarray(x), jnp.asarray(ids), jnp.asarray(weights), w13, w2)
    want = ref.moe(x, ids, weights, p13, s13, p2, s2, a1_scale=a1, a2_scale=a2, routed_scaling_factor=2.5)
    assert_moe_close(got, want, f"(weights seed {wseed})")
