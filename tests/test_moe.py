"""The MoE layer (steps 1-6): one case list on every implementation.

Reference path against the float64 model. The model reproduces every rounding of the numerics
contract (fp8 q1, bf16 c1, fp8 q2, bf16 c2, bf16 out) with the same scales, so the only
differences come from the reference accumulating in f32 where the model uses float64. Those move
a bf16 c1 / c2 value by one bf16 ulp when the exact value lies within the f32 error of a rounding
boundary (rare: ~1e-4 of the elements), and a changed c1 can move one q2 element by one fp8 ulp
(2^-4..2^-3 relative). One such q2 change perturbs a whole c2 row by about |dq| / (8 sqrt(I)) of
its norm, i.e. a fraction of a percent, and the token's output row by less, but it can move
single elements of that row by more than an element-wise bound would allow (seed 3267545452 of
the drops test: one c1 value one bf16 ulp apart, q2 code 12 -> 13, 18% of the row past one
ulp; seed 3416446752 of the 33-16-384-256 dynamic case: elements 0.0063 off against an atol of
0.0022). Hence, on the bf16 outputs:
  - ||out - model|| / ||model|| < 1e-2 (a few intermediate flips stay far below this);
  - every token's row close to the model's row, or to the row the model gives with one q2 code
    of that token at its other rounding (`numpy_model.moe_one_q2_flip`; slots naming the same
    expert compute the same row, so the code moves in all of them: seed 39 of the
    40-16-1024-256 one_expert case, where all 8 slots flip together), where close means:
    every element within rtol 1e-2 plus atol 5% of the output's rms (the seed's rtol 1e-2 /
    atol 0.1, scaled to these outputs), and >= 98% of the elements within one bf16 ulp (with
    the q2 codes equal only c2 and out flips remain, one element each: ~1e-3 of the elements).
    A wrong row, expert, slot or scale is not one code away.

CUDA path (precision=HIGHEST) against the reference path on the CPU: every step agrees with the
reference exactly (integers, fp8 gather) or to one bf16/fp8 rounding flip (GEMMs: f32 summation
order; SiLU: expf vs XLA's exp). Flips are rare (measured on the H100 at E=256, M=1: 2.4e-4 of
c1 values, none in q2; layer output 5.7e-6 relative), but one flipped c1 can move one fp8 code
of h (2^-3 relative), with probability ~2^-4.5 (a bf16 ulp against an fp8 spacing). One moved
code moves the small cases' outputs by a median 2e-4 (M = 33) to 1.6e-3 (M = 1) in norm; 5e-3
allows a couple and still fails on any wrong row, expert, scale or slot (those give O(1)
errors). Not covered: a move of one of the largest codes, up to 2.7e-2..6.5e-2 (float64 model,
5 seeds per small case), which a c1 flip next to such a code would give (not seen on a GPU).
With dynamic scales one flip can also move a scale: a2 = amax(h) / 448, so a flip of the gate
or up value behind the largest |h| changes a2 by about 2^-8 (both: 2^-7) and re-rounds every
code of q2 near a boundary (seed 3153372912 of the 1-4-256-128 case: on the CPU, a2 scaled by
1 - 2^-8 moves the output by 3.1% in norm; on an H200 the CUDA path's a2 was 0.6% below the
reference's and the layers differed by 4.0%). So the CUDA layer is compared with the reference
run at the scales the CUDA path computed for itself, and those scales are checked against the
reference's dynamic scales within 2^-7.

CUDA path at precision=DEFAULT (fp8 wgmma GEMMs), compared the same way, at the CUDA path's own
dynamic scales (its steps at DEFAULT), which must agree with the reference's within 2^-5. The
error model: every K = 32 wgmma instruction truncates its 32 products and the incoming group sum
to 14 bits below the largest of them (tests/test_grouped_gemm.py); a NumPy emulation of exactly
that reproduces the H100's GEMM measurements (normwise 8.4e-4, 99.2-99.7% within one bf16 ulp on
that file's outlier data), and on this test's data gives GEMM1 a normwise error e1 = 4.5e-4.
  - c1 is bf16, and that error is far below a bf16 ulp: it moves only a fraction p of the c1
    values (2.9% here), each by one ulp, so e1 ~ sqrt(p). A moved value changes its h by dh and
    moves that q2 code with probability |dh| / s by one code spacing s (emulated: 0.41% of the
    codes flip, as sum |dh| / s predicts: 0.408%), so E|dq2|^2 = sum |dh| s ~ p: the q2 error,
    and with it c2's and the output's (W2's rows and the slots mix independent code errors),
    is also ~ sqrt(p), i.e. linear in e1: kappa e1 with kappa = 5.4-7.2 (emulated layer against
    the reference at equal scales: 2.8e-3 to 3.3e-3 over 7 seeds at e1 = 4.5e-4, static scales
    alike; 4.4e-3, 7.6e-3 and 1.9e-2 with 13-, 12- and 10-bit sums, e1 = 7.3e-4, 1.2e-3 and
    3.5e-3). GEMM2's own error e2 adds ~1.5 e2 (emulated 2.7e-3 -> 2.8e-3).
  - Bound: with e1, e2 <= 2e-3 (the GEMM bound), 7.2 e1 + 1.5 e2 <= 1.7e-2 < 2e-2. The H100 ran
    the DeepSeek-V3 example layer at DEFAULT at 2.8e-3 (docs/performance.md).
  - The scales: a1 as at HIGHEST; a2 = amax|h| / 448, and a max moves by at most max|dh|, so a2
    moves by at most max|dh| / amax|h|: DEFAULT moves single c1 values by ~e1 of the c1 RMS, far
    below the gate and up values behind the largest |h|, but either may round to the next bf16
    value (2^-8..2^-7 relative each): < 2^-6 + 2e-3 < 2^-5. At the reference's scales that
    change alone re-rounds ~11x its size of all q2 codes and moves the layer by ~0.3
    sqrt(change): seed 1557850888 of the 300-16-1024-256-8 dynamic case on the CPU, with the
    largest |h|'s gate and up one ulp up or both down (a2 x 1.0118 / 0.9883): 3.0e-2, the
    3.18e-2 an H100 failed the former comparison (2e-2 at the reference's scales) with.
"""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import numpy_model as ref
import w4afp8_jax as w4
from helpers import (Model, assert_moe_close, int4_weights, on_device, on_every_implementation, reference_on_cpu,
                     routed_tokens)
from w4afp8_jax.fp8 import dynamic_scale
from w4afp8_jax.ops.silu_mul_quantize import kept_silu_mul
from w4afp8_jax.shapes import DEEPSEEK_V3_TP4

R = "reference"
HIGHEST = jax.lax.Precision.HIGHEST
TP4 = DEEPSEEK_V3_TP4


def layer_weights(rng, e, h, inter, gs=128):
    """NumPy (w13 packed, w13 scales, w2 packed, w2 scales) of a random layer [E, 2I, H], [E, H, I]."""
    return (*int4_weights(rng, e, 2 * inter, h, gs), *int4_weights(rng, e, h, inter, gs))


def device_weights(p13, s13, p2, s2, gs=128, layout="checkpoint"):
    return on_device(w4.W4Weights(p13, s13, gs), layout), on_device(w4.W4Weights(p2, s2, gs), layout)


def make_routing(rng, m, h, e, k, kind):
    """(x bf16 [M, H], topk_ids int32 [M, k], topk_weights f32 [M, k]) NumPy arrays. kind:
    "distinct" experts per token, "one_expert" (every slot on expert 3), "dropped" (a third of
    the slots on another GPU: id = E) or "duplicates" (a token may name an expert twice, and
    token 0 names one expert in every slot)."""
    x, ids, weights = routed_tokens(rng, m, h, e, k, distinct=kind in ("distinct", "dropped"))
    if kind == "one_expert":
        ids[:] = 3
    elif kind == "dropped":
        ids[rng.random((m, k)) < 0.33] = e
    elif kind == "duplicates":
        ids[0] = ids[0, 0]
    return x, ids, weights


def assert_layer_close(got, want, bound=5e-3):
    """The CUDA path's normwise bound against the reference path (see the top)."""
    got, want = np.asarray(got.astype(jnp.float32)), np.asarray(want.astype(jnp.float32))
    assert np.all(np.isfinite(got))
    rel = np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30)
    print(f"relative error {rel:.2e}")
    assert rel < bound, f"relative error {rel:.2e}"


def own_dynamic_scales(implementation, num_experts, precision=HIGHEST):
    """A function (x, topk_ids, w13) -> (a1, a2): the dynamic scales `moe` computes for itself
    from `implementation`'s intermediates (the same steps)."""
    def scales(x, ids, w13):
        routing = w4.route(ids, num_experts, implementation=implementation)
        s1 = dynamic_scale(x.astype(jnp.float32))
        q1, _ = w4.gather_quantize(x, routing.positions, s1, implementation=implementation)
        c1 = w4.grouped_gemm(q1, s1, w13, routing.group_offsets, precision=precision, implementation=implementation)
        return s1, dynamic_scale(kept_silu_mul(c1, routing.group_offsets))
    return scales


def scales_to_compare_at(args, num_experts, static, precision, rtol):
    """The scales to run the reference at against the CUDA layer: `static`, or the dynamic
    scales the CUDA path computed for itself at `precision`, after checking them against the
    reference's within rtol (see the top)."""
    if static:
        return static
    own = jax.jit(own_dynamic_scales("cuda", num_experts, precision))(*args[:2], args[3])
    want = reference_on_cpu(own_dynamic_scales(R, num_experts), *args[:2], args[3])
    np.testing.assert_allclose(np.asarray(own, np.float64), np.asarray(want, np.float64), rtol=rtol)
    return dict(a1_scale=float(own[0]), a2_scale=float(own[1]))


def layer_fn(implementation, rsf, scales, precision=HIGHEST):
    return jax.jit(lambda *a: w4.moe(*a, routed_scaling_factor=rsf, precision=precision,
                                     implementation=implementation, **scales))


# ------------------------------------------------------------------------------------------
# The case list: (M, E, H, I, group_size, k, routing kind, scales). Static scales are fixed
# numbers (a2 = 0.01 saturates the largest h at the DeepSeek-V3 shapes); the model reproduces
# any scale's roundings, so every scale is as good a test. "per_token": dynamic per-token
# scales (activation_scaling="per_token"), on the reference path only until the kernels have
# them.
# ------------------------------------------------------------------------------------------
SMALL = [(3, 1, 128, 128, 128, 1), (5, 8, 256, 128, 128, 2), (33, 16, 384, 256, 128, 4), (17, 32, 192, 64, 64, 8),
         (1, 4, 256, 128, 128, 4)]
CASES = [pytest.param(*case, id="-".join(map(str, case))) for case in [
    *[(*shape, "distinct", scales) for shape in SMALL for scales in ("dynamic", "static", "per_token")],
    (5, 4, 128, 128, 128, 6, "duplicates", "dynamic"),
    (5, 4, 128, 128, 128, 6, "duplicates", "per_token"),
    (40, 16, 1024, 256, 128, 8, "one_expert", "dynamic"),
    (40, 16, 1024, 256, 128, 8, "one_expert", "per_token"),
    (24, 16, 512, 256, 128, 8, "dropped", "per_token"),
    (300, 16, 1024, 256, 128, 8, "distinct", "static"),
    (1, TP4.experts, TP4.hidden, TP4.intermediate, 128, TP4.top_k, "distinct", "static"),
    (16, TP4.experts, TP4.hidden, TP4.intermediate, 128, TP4.top_k, "distinct", "dynamic"),
    (64, TP4.experts, TP4.hidden, TP4.intermediate, 128, TP4.top_k, "dropped", "static"),
]]
STATIC_SCALES = dict(a1_scale=0.02, a2_scale=0.01)


def scale_args(scales):
    """moe's keyword arguments for a case's scales."""
    return {"static": STATIC_SCALES, "dynamic": {}, "per_token": dict(activation_scaling="per_token")}[scales]


def small_on_cpu(m, e, h, inter, gs, k, kind, scales):
    """The reference path and the float64 model run the small layers here (the DeepSeek-V3 shapes
    have their own reference tests below, with weights built once)."""
    return e * h * inter <= 1e7 and m * k * h * inter <= 1e8


def kernel_shapes(m, e, h, inter, gs, k, kind, scales):
    """The CUDA path needs group size 128 and K = H, I multiples of it, and has no per-token
    scales yet (it refuses them: tests/test_validation.py)."""
    return gs == 128 and h % 128 == 0 and inter % 128 == 0 and scales != "per_token"


@pytest.mark.parametrize("implementation,m,e,h,inter,gs,k,kind,scales",
                         on_every_implementation(CASES, reference=small_on_cpu, cuda=kernel_shapes))
def test_moe(rng, implementation, m, e, h, inter, gs, k, kind, scales):
    p13, s13, p2, s2 = layer_weights(rng, e, h, inter, gs)
    x, ids, weights = make_routing(rng, m, h, e, k, kind)
    rsf = float(rng.uniform(0.5, 3.0))
    layout = "tiled" if implementation == "cuda" else "checkpoint"
    args = (jnp.asarray(x), jnp.asarray(ids), jnp.asarray(weights), *device_weights(p13, s13, p2, s2, gs, layout))
    got = layer_fn(implementation, rsf, scale_args(scales))(*args)
    if implementation == "reference":
        assert_moe_close(got, Model(x, ids, weights, p13, s13, p2, s2, gs, routed_scaling_factor=rsf,
                                    **scale_args(scales)))
    else:
        static = STATIC_SCALES if scales == "static" else {}
        at = scales_to_compare_at(args, e, static, HIGHEST, rtol=2**-7)
        assert_layer_close(got, reference_on_cpu(layer_fn(R, rsf, at), *args))


@pytest.mark.gpu
@pytest.mark.parametrize("m,e,h,inter,k,scales", [(300, 16, 1024, 256, 8, "dynamic"), (300, 16, 1024, 256, 8, "static")],
                         ids=["300-16-1024-256-8-dynamic", "300-16-1024-256-8-static"])
def test_moe_default_precision(rng, m, e, h, inter, k, scales):
    """precision=None (DEFAULT) at prefill size (150 rows per expert: the wgmma GEMMs), against the
    reference at the CUDA path's own scales (bounds at the top)."""
    static = STATIC_SCALES if scales == "static" else {}
    x, ids, weights = make_routing(rng, m, h, e, k, "distinct")
    args = (jnp.asarray(x), jnp.asarray(ids), jnp.asarray(weights),
            *device_weights(*layer_weights(rng, e, h, inter), layout="tiled"))
    got = layer_fn("cuda", 2.5, static, precision=None)(*args)
    at = scales_to_compare_at(args, e, static, None, rtol=2**-5)
    assert_layer_close(got, reference_on_cpu(layer_fn(R, 2.5, at), *args), bound=2e-2)


# ------------------------------------------------------------------------------------------
# Reference path: the layer equals its steps, routed_scaling_factor and dropped slots
# ------------------------------------------------------------------------------------------
def steps_problem(rng, e=16, h=256, inter=128, k=4, m=9):
    """(NumPy x, ids, weights, layer weights, the layer's arguments) of the steps tests, a fifth
    of the slots dropped (expert parallelism)."""
    p13, s13, p2, s2 = layer_weights(rng, e, h, inter)
    x, ids, weights = routed_tokens(rng, m, h, e, k)
    ids[rng.random(ids.shape) < 0.2] = e  # expert-parallel drops
    args = (jnp.asarray(x), jnp.asarray(ids), jnp.asarray(weights), *device_weights(p13, s13, p2, s2))
    return x, ids, weights, (p13, s13, p2, s2), args


def layer_by_steps(x, ids, weights, w13, w2, scale=None):
    """The layer spelled out with the public steps (rsf 2.5), both requantizations at `scale`."""
    r = w4.route(ids, w13.num_experts, implementation=R)
    q1, s1 = w4.gather_quantize(x, r.positions, scale, implementation=R)
    c1 = w4.grouped_gemm(q1, s1, w13, r.group_offsets, implementation=R)
    q2, s2 = w4.silu_mul_quantize(c1, r.group_offsets, scale, implementation=R)
    c2 = w4.grouped_gemm(q2, s2, w2, r.group_offsets, implementation=R)
    return w4.combine(c2, r.positions, weights, 2.5, implementation=R)


def test_moe_equals_its_steps_and_jit(rng):
    x, ids, weights, (p13, s13, p2, s2), args = steps_problem(rng)
    got = np.asarray(w4.moe(*args, routed_scaling_factor=2.5, implementation=R))
    # The same pipeline spelled out with the public steps: bit-identical.
    steps = np.asarray(layer_by_steps(*args))
    np.testing.assert_array_equal(got.view(np.uint16), steps.view(np.uint16))
    want = Model(x, ids, weights, p13, s13, p2, s2, routed_scaling_factor=2.5)
    assert_moe_close(got, want)
    # Under jit, weights and (traced) static scales as arguments.
    fn = jax.jit(lambda *a, s1=None, s2=None: w4.moe(*a, a1_scale=s1, a2_scale=s2, routed_scaling_factor=2.5,
                                                       implementation=R))
    assert_moe_close(fn(*args), want)
    im = want.intermediates  # the scales do not depend on routed_scaling_factor
    a1, a2 = float(im["s1"] * 1.3), float(im["s2"] * 0.9)
    want_static = Model(x, ids, weights, p13, s13, p2, s2, a1_scale=a1, a2_scale=a2, routed_scaling_factor=2.5)
    assert_moe_close(fn(*args, s1=jnp.float32(a1), s2=jnp.float32(a2)), want_static)


def test_moe_per_token_equals_its_steps(rng):
    """activation_scaling="per_token" is the public steps with scale="per_token": gather_quantize's
    per-row scales (each token's, on every row it fills) and silu_mul_quantize's go to
    grouped_gemm as they are; bit-identical eagerly and under jit."""
    x, ids, weights, (p13, s13, p2, s2), args = steps_problem(rng)

    def layer(*args):
        return w4.moe(*args, activation_scaling="per_token", routed_scaling_factor=2.5, implementation=R)

    got = np.asarray(layer(*args))
    by_steps = lambda *a: layer_by_steps(*a, scale="per_token")  # noqa: E731
    for other in (by_steps(*args), jax.jit(by_steps)(*args), jax.jit(layer)(*args)):
        np.testing.assert_array_equal(got.view(np.uint16), np.asarray(other).view(np.uint16))
    assert_moe_close(got, Model(x, ids, weights, p13, s13, p2, s2, routed_scaling_factor=2.5,
                                activation_scaling="per_token"))


def test_moe_per_token_non_finite_rows(rng):
    """The non-finite rules per row: an inf in x[t] quantizes like the largest finite value of
    its row (+-448), so it changes nothing; a NaN makes out[t] NaN. Every other token is bitwise
    what it is with that token all zero (its rows' scales are their own), and a huge token
    changes no other token either (with per-tensor scales it would coarsen all of them)."""
    e, h, inter, k, m = 8, 256, 128, 3, 6
    w13, w2 = device_weights(*layer_weights(rng, e, h, inter))
    x, ids, weights = routed_tokens(rng, m, h, e, k)
    clean = x.astype(np.float32)
    bad = clean.copy()
    for t, sign in ((0, 1), (3, -1)):  # next to the row's largest |value|, which stays: q = +-448, as for +-inf
        col = (np.argmax(np.abs(clean[t])) + 1) % h
        clean[t, col], bad[t, col] = sign * np.abs(clean[t]).max(), sign * np.inf
    bad[1, 100] = np.nan
    bad[4] *= 1e4
    zeroed = clean.copy()
    zeroed[[1, 4]] = 0
    layer = jax.jit(lambda x: w4.moe(x, jnp.asarray(ids), jnp.asarray(weights), w13, w2, activation_scaling="per_token",
                                     routed_scaling_factor=2.5, implementation=R).astype(jnp.float32))
    got, want = (np.asarray(layer(jnp.asarray(a, jnp.bfloat16))) for a in (bad, zeroed))
    others = ~np.isin(np.arange(m), [1, 4])
    assert np.isnan(got[1]).all() and np.isfinite(got[4]).all() and np.any(got[4])
    assert np.isfinite(got[others]).all() and np.any(got[others])
    np.testing.assert_array_equal(got[others], want[others])


def test_moe_routed_scaling_factor_and_drops(rng):
    e, h, inter, k, m = 8, 256, 128, 4, 6
    p13, s13, p2, s2 = layer_weights(rng, e, h, inter)
    x, ids, weights = routed_tokens(rng, m, h, e, k)
    w13, w2 = device_weights(p13, s13, p2, s2)
    run = lambda i, rsf: np.asarray(w4.moe(jnp.asarray(x), jnp.asarray(i), jnp.asarray(weights), w13, w2,  # noqa: E731
                                           routed_scaling_factor=rsf, implementation=R)).astype(np.float32)
    base = run(ids, 1.0)
    # A power-of-two factor commutes with the final f32 multiply and bf16 rounding: exact.
    np.testing.assert_array_equal(run(ids, 4.0), 4.0 * base)
    assert_moe_close(run(ids, 2.5).astype(ref.BF16), Model(x, ids, weights, p13, s13, p2, s2, routed_scaling_factor=2.5))
    # Dropping slots (id = E, -1, huge) removes exactly their contribution.
    dropped = ids.copy()
    dropped[0, :] = e  # token 0 loses every expert: its row must be exactly zero
    dropped[1, 1], dropped[2, 3], dropped[3, 0] = -1, 2**31 - 1, e
    got = run(dropped, 2.5)
    assert np.all(got[0] == 0)
    assert_moe_close(got.astype(ref.BF16), Model(x, dropped, weights, p13, s13, p2, s2, routed_scaling_factor=2.5))
    # All slots dropped: the output is exactly zero.
    assert np.all(run(np.full_like(ids, e), 2.5) == 0)


# ------------------------------------------------------------------------------------------
# Reference path at the DeepSeek-V3 TP4 shapes (E=256, H=7168, I=512, top-8), weights built once
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def deepseek_weights(module_rng):
    """Built once per module (1.4 GB of int4). The NumPy views share the JAX buffers."""
    seed, rng = module_rng
    p13, s13, p2, s2 = layer_weights(rng, TP4.experts, TP4.hidden, TP4.intermediate)
    w13, w2 = device_weights(p13, s13, p2, s2)
    del p13, p2
    np_views = (np.asarray(w13.packed), np.asarray(w13.scales), np.asarray(w2.packed), np.asarray(w2.scales))
    return seed, w13, w2, np_views


@pytest.mark.parametrize("m,scaling", [pytest.param(m, "per_tensor", id=str(m)) for m in (1, 3, 16, 64)]
                         + [pytest.param(16, "per_token", id="16-per_token")])
def test_moe_deepseek_shapes(rng, deepseek_weights, m, scaling):
    wseed, w13, w2, (p13, s13, p2, s2) = deepseek_weights
    assert p13.shape == (TP4.experts, 2 * TP4.intermediate, TP4.hidden // 2)
    assert p2.shape == (TP4.experts, TP4.hidden, TP4.intermediate // 2)
    x, ids, weights = routed_tokens(rng, m, TP4.hidden, TP4.experts, TP4.top_k)
    got = w4.moe(jnp.asarray(x), jnp.asarray(ids), jnp.asarray(weights), w13, w2, activation_scaling=scaling,
                 routed_scaling_factor=TP4.routed_scaling_factor, implementation=R)
    want = Model(x, ids, weights, p13, s13, p2, s2, activation_scaling=scaling,
                 routed_scaling_factor=TP4.routed_scaling_factor)  # only the experts hit
    assert_moe_close(got, want, f"(weights seed {wseed})")


def test_moe_deepseek_static_scales_drops_jit(rng, deepseek_weights):
    wseed, w13, w2, (p13, s13, p2, s2) = deepseek_weights
    m, e, rsf = 4, TP4.experts, TP4.routed_scaling_factor
    x, ids, weights = routed_tokens(rng, m, TP4.hidden, e, TP4.top_k)
    ids[rng.random(ids.shape) < 0.25] = e  # experts held by another GPU
    ids[1, 2] = -1
    a1 = float(np.abs(x.astype(np.float32)).max() / 448 * 0.8)  # largest activations saturate
    a2 = float(rng.uniform(0.03, 0.1))
    fn = jax.jit(lambda *a: w4.moe(*a, a1_scale=a1, a2_scale=a2, routed_scaling_factor=rsf, implementation=R))
    got = fn(jnp.asarray(x), jnp.asarray(ids), jnp.asarray(weights), w13, w2)
    want = Model(x, ids, weights, p13, s13, p2, s2, a1_scale=a1, a2_scale=a2, routed_scaling_factor=rsf)
    assert_moe_close(got, want, f"(weights seed {wseed})")


# ------------------------------------------------------------------------------------------
# CUDA path under CUDA graphs
# ------------------------------------------------------------------------------------------
GRAPH_SCRIPT = textwrap.dedent("""
    import sys
    import jax, jax.numpy as jnp, numpy as np, w4afp8_jax as w4
    from helpers import reference_on_cpu, w4_weights
    from test_moe import own_dynamic_scales
    rng = np.random.default_rng(int(sys.argv[1]))
    e, h, inter, m = 32, 1024, 256, 24
    w13, w2 = w4_weights(rng, e, 2 * inter, h, layout="tiled"), w4_weights(rng, e, h, inter, layout="tiled")
    run = lambda impl, *a, **scales: w4.moe(*a, routed_scaling_factor=2.5, precision=jax.lax.Precision.HIGHEST,
                                            implementation=impl, **scales)
    layer = jax.jit(lambda *a: run("cuda", *a))
    # Dynamic scales: the reference runs at the CUDA path's own ones (test_moe's docstring).
    own_scales = jax.jit(own_dynamic_scales("cuda", e))
    reference = lambda x, ids, tw, w13, w2, a1, a2: run("reference", x, ids, tw, w13, w2, a1_scale=a1, a2_scale=a2)
    for call in range(3):  # one executable, new routing and new token values every call
        ids = jnp.asarray(rng.integers(0, e, (m, 8)).astype(np.int32))
        tw = jnp.asarray(rng.random((m, 8)).astype(np.float32))
        x = jnp.asarray(rng.standard_normal((m, h)), jnp.bfloat16)
        got = np.asarray(layer(x, ids, tw, w13, w2).astype(jnp.float32))
        a1, a2 = own_scales(x, ids, w13)
        want = np.asarray(reference_on_cpu(reference, x, ids, tw, w13, w2, a1, a2).astype(jnp.float32))
        rel = np.linalg.norm(got - want) / np.linalg.norm(want)
        assert rel < 5e-3, (call, rel)
        print("call", call, "relative error", rel)
    assert layer._cache_size() == 1
    print("GRAPH_OK")
""")


@pytest.mark.gpu
def test_moe_under_cuda_graphs_three_calls(rng):
    """XLA command buffers (CUDA graphs) forced on for every custom call and fusion: a handler
    that read sizes or offsets on the host, or baked them in at capture, fails here."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_gpu_enable_command_buffer=FUSION,CUSTOM_CALL"
                        " --xla_gpu_graph_min_graph_size=1").strip()
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(__file__), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    seed = str(rng.integers(2**31))
    result = subprocess.run([sys.executable, "-c", GRAPH_SCRIPT, seed], env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0 and "GRAPH_OK" in result.stdout, result.stdout + result.stderr[-3000:]
