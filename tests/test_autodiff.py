"""Differentiation (docs/numerics.md, "Differentiation"): every public op either raises a
TypeError naming the op and the argument when JAX traces its derivative, or returns the exact
gradient of the documented function. Never a silent zero.

- quantize_fp8, gather_quantize, silu_mul_quantize, grouped_gemm, and moe with respect to x, its
  scales or its weight scales: TypeError (eagerly, under jit, for grad, jvp and vjp).
- combine with respect to rows and topk_weights, moe with respect to topk_weights: exact (the
  outputs are linear in them), checked against the float64 analytic gradient and against central
  differences, which are exact for a linear function up to the bf16 rounding of the outputs.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import w4afp8_jax as w4
from helpers import EVERY_IMPLEMENTATION

E, H, I, M, K = 4, 256, 128, 5, 3
BF16, FP8 = jnp.bfloat16, jnp.float8_e4m3fn


@pytest.fixture
def problem(rng):
    def weights(n, k):
        return w4.W4Weights(jnp.asarray(rng.integers(0, 256, (E, n, k // 2), dtype=np.uint8)),
                            jnp.asarray(rng.standard_normal((E, n, k // 128)) * 0.005, jnp.float32))
    ids = np.stack([rng.choice(E, K, replace=False) for _ in range(M)]).astype(np.int32)
    ids[0, 1] = E  # a dropped slot
    return dict(x=jnp.asarray(rng.standard_normal((M, H)), BF16), ids=jnp.asarray(ids),
                tw=jnp.asarray(rng.random((M, K)) + 0.1, jnp.float32), w13=weights(2 * I, H), w2=weights(H, I))


def loss_of(fn):
    """A scalar loss of fn's output, whatever its float dtype (fp8 and bf16 included)."""
    return lambda v: jnp.sum(fn(v).astype(jnp.float32) * 0.5)


def raising_cases(p, impl):
    """(op, argument name, function of that argument alone, its value) for every argument that
    must refuse differentiation."""
    r = w4.route(p["ids"], E, implementation="reference")
    q1, s1 = w4.gather_quantize(p["x"], r.positions, implementation="reference")
    c1 = w4.grouped_gemm(q1, s1, p["w13"], r.group_offsets, implementation="reference")
    gq = lambda x, s=None: w4.gather_quantize(x, r.positions, s, implementation=impl)[0]  # noqa: E731
    sq = lambda c, s=None: w4.silu_mul_quantize(c, r.group_offsets, s, implementation=impl)[0]  # noqa: E731
    gemm = lambda lhs, s, w: w4.grouped_gemm(lhs, s, w, r.group_offsets, implementation=impl)  # noqa: E731
    layer = lambda x=p["x"], w13=p["w13"], w2=p["w2"], **kw: w4.moe(  # noqa: E731
        x, p["ids"], p["tw"], w13, w2, implementation=impl, **kw)
    with_scales = lambda w, s: w4.W4Weights(w.packed, s)  # noqa: E731
    x32 = p["x"].astype(jnp.float32)
    return [
        ("quantize_fp8", "x", lambda x: w4.quantize_fp8(x)[0], x32),
        ("quantize_fp8", "x", lambda x: w4.quantize_fp8(x, 0.01)[0], x32),
        ("quantize_fp8", "scale", lambda s: w4.quantize_fp8(x32, s)[0], jnp.float32(0.01)),
        ("gather_quantize", "x", gq, p["x"]),
        ("gather_quantize", "scale", lambda s: gq(p["x"], s), jnp.float32(0.01)),
        ("silu_mul_quantize", "c1", sq, c1),
        ("silu_mul_quantize", "scale", lambda s: sq(c1, s), jnp.float32(0.01)),
        ("grouped_gemm", "lhs", lambda lhs: gemm(lhs, s1, p["w13"]), q1),
        ("grouped_gemm", "lhs_scale", lambda s: gemm(q1, s, p["w13"]), s1),
        ("grouped_gemm", "rhs.scales", lambda s: gemm(q1, s1, with_scales(p["w13"], s)), p["w13"].scales),
        ("moe", "x", lambda x: layer(x=x), p["x"]),
        ("moe", "x", lambda x: layer(x=x, a1_scale=0.02, a2_scale=0.01), p["x"]),
        ("moe", "a1_scale", lambda s: layer(a1_scale=s), jnp.float32(0.02)),
        ("moe", "a2_scale", lambda s: layer(a2_scale=s), jnp.float32(0.01)),
        ("moe", "w13.scales", lambda s: layer(w13=with_scales(p["w13"], s)), p["w13"].scales),
        ("moe", "w2.scales", lambda s: layer(w2=with_scales(p["w2"], s)), p["w2"].scales),
    ]


@pytest.mark.parametrize("impl", EVERY_IMPLEMENTATION)
def test_differentiation_raises_a_named_error(problem, impl):
    for op, name, fn, value in raising_cases(problem, impl):
        message = rf"^{op} is not differentiable with respect to {name}: .*jax.lax.stop_gradient"
        loss = loss_of(fn)
        for how, run in (("grad", lambda: jax.grad(loss)(value)),
                         ("jit(grad)", lambda: jax.jit(jax.grad(loss))(value)),
                         ("jvp", lambda: jax.jvp(loss, (value,), (jnp.ones_like(value),))),
                         ("vjp", lambda: jax.vjp(fn, value))):
            with pytest.raises(TypeError, match=message):
                run()
                pytest.fail(f"{how} of {op} with respect to {name} did not raise")
        # Without differentiation the same functions run, eagerly and under jit.
        assert np.isfinite(float(loss(value))) and np.isfinite(float(jax.jit(loss)(value)))


def cosine(a, b):
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    return a @ b / (np.linalg.norm(a) * np.linalg.norm(b))


def check_gradient(grad, want, out_fn, ct, value, rtol):
    """grad (of sum(ct * out_fn(v))) against the float64 analytic gradient `want`, elementwise and
    by cosine, and against a central difference along d = grad: for a function linear in v,
    L(v + d) - L(v - d) = <grad, (v + d) - (v - d)> exactly, up to the bf16 rounding of out_fn's
    outputs, which moves each L by at most 2^-9 sum |ct * out| (2^-8 allows the f32 sums too)."""
    grad = np.asarray(jnp.asarray(grad).astype(jnp.float32), np.float64)
    assert np.any(grad)
    assert cosine(grad, want) > 0.9999
    np.testing.assert_allclose(grad, want, rtol=rtol, atol=rtol * np.abs(want).max())
    d = jnp.asarray(grad, value.dtype)
    plus, minus = value + d, value - d  # rounded to value's dtype: the step actually taken
    outs = [np.asarray(out_fn(v), np.float64) for v in (plus, minus)]
    finite_difference = np.sum(ct * outs[0]) - np.sum(ct * outs[1])
    step = np.asarray(plus.astype(jnp.float32), np.float64) - np.asarray(minus.astype(jnp.float32), np.float64)
    directional = np.sum(grad * step)
    bound = 2.0**-8 * sum(np.sum(np.abs(ct * o)) for o in outs)
    assert bound < 0.25 * abs(directional)  # so the check below fails for any gradient 25% off along d
    assert abs(finite_difference - directional) <= bound, (finite_difference, directional, bound)


@pytest.mark.parametrize("impl", EVERY_IMPLEMENTATION)
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_combine_gradients_are_exact(rng, impl, jit):
    r = 8
    rows = jnp.asarray(rng.standard_normal((r, H)), BF16)
    pos = jnp.asarray(rng.integers(-2, r + 2, size=(M, K)), jnp.int32)  # some dropped (outside [0, r)), repeats
    tw = jnp.asarray(rng.random((M, K)) + 0.1, jnp.float32)
    ct = np.asarray(jnp.asarray(rng.standard_normal((M, H)), BF16).astype(jnp.float32), np.float64)  # bf16-exact
    rsf = 2.5
    out = lambda rows, tw: w4.combine(rows, pos, tw, rsf, implementation=impl).astype(jnp.float32)  # noqa: E731
    loss = lambda rows, tw: jnp.sum(out(rows, tw) * jnp.asarray(ct, jnp.float32))  # noqa: E731
    grad = jax.jit(jax.grad(loss, argnums=(0, 1))) if jit else jax.grad(loss, argnums=(0, 1))
    g_rows, g_tw = grad(rows, tw)
    assert g_rows.dtype == BF16 and g_tw.dtype == jnp.float32
    # Analytic, float64: d/dtw[t, j] = rsf <ct[t], rows[pos[t, j]]>, d/drows[p] = rsf sum tw[t, j] ct[t].
    p_np, rows64, tw64 = np.asarray(pos), np.asarray(rows.astype(jnp.float32), np.float64), np.asarray(tw, np.float64)
    kept = (p_np >= 0) & (p_np < r)
    want_tw = np.where(kept, rsf * np.einsum("th,tjh->tj", ct, rows64[np.where(kept, p_np, 0)]), 0.0)
    want_rows = np.zeros((r, H))
    for t, j in zip(*np.nonzero(kept)):
        want_rows[p_np[t, j]] += rsf * tw64[t, j] * ct[t]
    check_gradient(g_tw, want_tw, lambda v: out(rows, v), ct, tw, rtol=1e-5)
    check_gradient(g_rows, want_rows, lambda v: out(v, tw), ct, rows, rtol=1e-2)  # the rows' gradient is bf16


@pytest.mark.parametrize("impl", EVERY_IMPLEMENTATION)
@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_moe_gradient_with_respect_to_topk_weights(rng, problem, impl, static):
    p = problem
    scales = dict(a1_scale=0.02, a2_scale=0.01) if static else {}
    rsf = 2.5
    ct = np.asarray(jnp.asarray(rng.standard_normal((M, H)), BF16).astype(jnp.float32), np.float64)
    layer = lambda tw, x=p["x"]: w4.moe(x, p["ids"], tw, p["w13"], p["w2"], routed_scaling_factor=rsf,  # noqa: E731
                                        implementation=impl, **scales).astype(jnp.float32)
    loss = lambda tw: jnp.sum(layer(tw) * jnp.asarray(ct, jnp.float32))  # noqa: E731
    g = jax.jit(jax.grad(loss))(p["tw"])
    # Analytic: the layer is rsf * sum_j tw[t, j] c2[pos[t, j]], with c2 from the same steps.
    r = w4.route(p["ids"], E, implementation=impl)
    q1, s1 = w4.gather_quantize(p["x"], r.positions, scales.get("a1_scale"), implementation=impl)
    c1 = w4.grouped_gemm(q1, s1, p["w13"], r.group_offsets, implementation=impl)
    q2, s2 = w4.silu_mul_quantize(c1, r.group_offsets, scales.get("a2_scale"), implementation=impl)
    c2 = np.asarray(w4.grouped_gemm(q2, s2, p["w2"], r.group_offsets, implementation=impl).astype(jnp.float32),
                    np.float64)
    pos = np.asarray(r.positions)
    want = np.where(pos >= 0, rsf * np.einsum("th,tjh->tj", ct, c2[np.maximum(pos, 0)]), 0.0)
    assert np.all(np.asarray(g)[pos < 0] == 0)  # the dropped slot's weight has no effect
    check_gradient(g, want, layer, ct, p["tw"], rtol=1e-4)
    # x is not differentiated here; stop_gradient on it is allowed too.
    g2 = jax.grad(lambda tw: jnp.sum(layer(tw, jax.lax.stop_gradient(p["x"])) * jnp.asarray(ct, jnp.float32)))(p["tw"])
    # The same f32 products, summed over H in the order each program chose (eager vs jit): they
    # may differ by H ulps of the sum of the products' magnitudes, no more.
    magnitude = rsf * np.einsum("th,tjh->tj", np.abs(ct), np.abs(c2[np.maximum(pos, 0)]))
    assert np.all(np.abs(np.asarray(g2, np.float64) - np.asarray(g, np.float64)) <= H * 2.0**-23 * magnitude)
