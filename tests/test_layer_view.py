"""W4Weights.layer(i): one layer of a stack, read in place by the kernels (no per-layer copy).

The view must compute exactly what the sliced weight set computes: on the reference path
(bitwise, it indexes the stack) and on the CUDA path (bitwise against the CUDA path on the
sliced set: the same kernel reads the same bytes), inside a jitted lax.scan over layer
indices as model code writes it; a concrete index outside [0, L) raises, a traced one is clamped
the same way on both paths.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import w4afp8_jax as w4

LAYERS, E, N, K, ROWS = 3, 4, 32, 256, 12


def make_stack(rng):
    w = rng.standard_normal((LAYERS, E, N, K)).astype(np.float32)
    per_layer = [w4.quantize_weights(w[i]).prepare() for i in range(LAYERS)]
    return jax.tree.map(lambda *a: jnp.stack(a), *per_layer), per_layer


def problem(rng):
    q = jnp.asarray(rng.standard_normal((ROWS, K)) * 30, jnp.float32).astype(jnp.float8_e4m3fn)
    counts = rng.multinomial(ROWS, np.ones(E) / E)
    offsets = jnp.asarray(np.concatenate([[0], np.cumsum(counts)]), jnp.int32)
    return q, offsets


def scan_over_layers(stack, q, offsets, implementation):
    @jax.jit
    def run(stack, q, offsets):
        def body(_, i):
            return None, w4.grouped_gemm(q, 0.02, stack.layer(i), offsets, implementation=implementation)
        return jax.lax.scan(body, None, jnp.arange(LAYERS))[1]
    return np.asarray(run(stack, q, offsets).astype(jnp.float32))


def sliced(per_layer, q, offsets, implementation):
    return np.stack([np.asarray(w4.grouped_gemm(q, 0.02, w, offsets, implementation=implementation)
                                .astype(jnp.float32)) for w in per_layer])


@pytest.mark.parametrize("implementation", ["reference", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_layer_view_equals_sliced_weights(rng, implementation):
    stack, per_layer = make_stack(rng)
    q, offsets = problem(rng)
    got = scan_over_layers(stack, q, offsets, implementation)
    want = sliced(per_layer, q, offsets, implementation)
    assert np.abs(want).max() > 0
    np.testing.assert_array_equal(got, want)


def test_layer_view_dequantizes_its_layer(rng):
    stack, per_layer = make_stack(rng)
    np.testing.assert_array_equal(np.asarray(stack.layer(1).dequantize()), np.asarray(per_layer[1].dequantize()))
    assert "index=int32[]" in repr(stack.layer(1))


def test_layer_view_errors(rng):
    stack, per_layer = make_stack(rng)
    with pytest.raises(ValueError, match="stack of weight sets"):
        per_layer[0].layer(0)
    with pytest.raises(ValueError, match="already indexed"):
        stack.layer(0).layer(0)
    with pytest.raises(ValueError, match="integer scalar"):
        stack.layer(jnp.zeros(2, jnp.int32))
    for index in (-1, LAYERS):
        with pytest.raises(ValueError, match=rf"index must be in \[0, {LAYERS}\)"):
            stack.layer(index)
    q, offsets = problem(rng)
    with pytest.raises(ValueError, match=r"rhs.layer\(i\)"):
        w4.grouped_gemm(q, 0.02, stack, offsets, implementation="reference")


@pytest.mark.parametrize("implementation", ["reference", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_layer_view_clamps_a_traced_index(rng, implementation):
    """A traced index outside [0, L) is clamped, the same way on both paths (no wrapping)."""
    stack, per_layer = make_stack(rng)
    q, offsets = problem(rng)
    run = jax.jit(lambda s, i: w4.grouped_gemm(q, 0.02, s.layer(i), offsets, implementation=implementation))
    for index, layer in ((-1, 0), (-5, 0), (LAYERS, LAYERS - 1), (LAYERS + 7, LAYERS - 1)):
        got = run(stack, jnp.int32(index))
        want = w4.grouped_gemm(q, 0.02, per_layer[layer], offsets, implementation=implementation)
        np.testing.assert_array_equal(np.asarray(got.astype(jnp.float32)), np.asarray(want.astype(jnp.float32)))


@pytest.mark.parametrize("implementation", ["reference", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_moe_scan_over_layer_views(rng, implementation):
    """A decode-style stack: moe per layer inside lax.scan, views of stacked w13 / w2."""
    h, inter, m, top_k = 256, 128, 5, 2
    w13s = [w4.quantize_weights(rng.standard_normal((E, 2 * inter, h)).astype(np.float32) * 0.05).prepare()
            for _ in range(LAYERS)]
    w2s = [w4.quantize_weights(rng.standard_normal((E, h, inter)).astype(np.float32) * 0.05).prepare()
           for _ in range(LAYERS)]
    w13, w2 = (jax.tree.map(lambda *a: jnp.stack(a), *ws) for ws in (w13s, w2s))
    x = jnp.asarray(rng.standard_normal((m, h)), jnp.bfloat16)
    ids = jnp.asarray(np.stack([rng.choice(E, top_k, replace=False) for _ in range(m)]), jnp.int32)
    weights = jnp.full((m, top_k), 0.5, jnp.float32)

    def layer(x, a, b):
        return w4.moe(x, ids, weights, a, b, a1_scale=0.02, a2_scale=0.02, implementation=implementation)

    out = jax.jit(lambda x: jax.lax.scan(lambda x, i: (layer(x, w13.layer(i), w2.layer(i)), None), x,
                                         jnp.arange(LAYERS))[0])(x)
    want = x
    for a, b in zip(w13s, w2s):
        want = layer(want, a, b)
    np.testing.assert_array_equal(np.asarray(out.astype(jnp.float32)), np.asarray(want.astype(jnp.float32)))
