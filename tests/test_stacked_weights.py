"""Layer-stacked W4Weights ([L, E, N, K/2]): pytree stacking, lax.scan and vmap over layers."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import numpy_model as ref
import w4afp8_jax as w4

L, E, H, INTER, M, TOP_K = 3, 4, 256, 128, 5, 2


def layer_weights(rng, n, k):
    packed = rng.integers(0, 256, size=(E, n, k // 2), dtype=np.uint8)
    scales = (rng.standard_normal((E, n, k // 128)) * 0.005).astype(np.float32)
    return w4.W4Weights(jnp.asarray(packed), jnp.asarray(scales))


def stack(ws):
    return jax.tree.map(lambda *a: jnp.stack(a), *ws)


@pytest.fixture
def layers(rng):
    w13 = [layer_weights(rng, 2 * INTER, H) for _ in range(L)]
    w2 = [layer_weights(rng, H, INTER) for _ in range(L)]
    return w13, w2


def test_stack_keeps_leading_axes(layers):
    w13 = stack(layers[0])
    assert isinstance(w13, w4.W4Weights)
    assert w13.packed.shape == (L, E, 2 * INTER, H // 2) and w13.scales.shape == (L, E, 2 * INTER, H // 128)
    assert (w13.num_experts, w13.out_features, w13.in_features) == (E, 2 * INTER, H)
    tiled = w13.prepare()
    assert tiled.packed.shape == w13.packed.shape
    for i, one in enumerate(layers[0]):
        np.testing.assert_array_equal(tiled.packed[i], one.prepare().packed)
        np.testing.assert_array_equal(w13.int4_values()[i], one.int4_values())
        np.testing.assert_array_equal(w13.dequantize()[i], one.dequantize())
        np.testing.assert_array_equal(tiled.dequantize()[i], one.dequantize())
        np.testing.assert_array_equal(tiled.checkpoint_packed()[i], one.packed)
    # Against the independent model, all layers at once (f32 product of int4 and f32 scale: one rounding).
    np.testing.assert_allclose(w13.dequantize(), ref.dequantize(np.asarray(w13.packed), np.asarray(w13.scales), 128),
                               rtol=2**-24, atol=0)


def test_repr_shows_shapes_not_elements(layers):
    text = repr(stack(layers[0]))
    assert text == (f"W4Weights(packed=uint8[{L}, {E}, {2 * INTER}, {H // 2}], "
                    f"scales=float32[{L}, {E}, {2 * INTER}, {H // 128}], group_size=128, layout='checkpoint')")


def test_scan_over_layers_equals_python_loop(rng, layers):
    w13, w2 = stack(layers[0]).prepare(), stack(layers[1]).prepare()
    x = jnp.asarray(rng.standard_normal((M, H)).astype(ml_dtypes.bfloat16))
    ids = jnp.asarray(np.stack([rng.choice(E, TOP_K, replace=False) for _ in range(M)]).astype(np.int32))
    tw = jnp.asarray(rng.random((M, TOP_K)).astype(np.float32))

    def block(x, w13, w2):
        return (x.astype(jnp.float32) + w4.moe(x, ids, tw, w13, w2, a1_scale=0.01, a2_scale=0.02,
                                                implementation="reference").astype(jnp.float32)).astype(jnp.bfloat16)

    @jax.jit
    def scanned(x, w13, w2):
        return jax.lax.scan(lambda x, w: (block(x, *w), None), x, (w13, w2))[0]

    one = jax.jit(block)
    want = x
    for i in range(L):
        want = one(want, layers[0][i].prepare(), layers[1][i].prepare())
    got = scanned(x, w13, w2)
    assert float(jnp.max(jnp.abs(want.astype(jnp.float32)))) > 0
    # Same ops on the same per-layer arrays: the scan body only slices the weights.
    np.testing.assert_array_equal(np.asarray(got.astype(jnp.float32)), np.asarray(want.astype(jnp.float32)))


def test_vmap_over_layer_axis(rng, layers):
    w13 = stack(layers[0])
    lhs, scale = w4.quantize_fp8(jnp.asarray(rng.standard_normal((6, H)), jnp.float32))
    offsets = jnp.asarray([0, 1, 1, 4, 6], jnp.int32)
    got = jax.vmap(lambda w: w4.grouped_gemm(lhs, scale, w, offsets, implementation="reference"))(w13)
    assert got.shape == (L, 6, 2 * INTER)
    for i, one in enumerate(layers[0]):
        want = w4.grouped_gemm(lhs, scale, one, offsets, implementation="reference")
        np.testing.assert_array_equal(np.asarray(got[i].astype(jnp.float32)), np.asarray(want.astype(jnp.float32)))
    np.testing.assert_array_equal(jax.vmap(lambda w: w.dequantize())(w13), w13.dequantize())


def test_ops_reject_stacked_weights_by_name(rng, layers):
    w13, w2 = stack(layers[0]), stack(layers[1])
    lhs, scale = w4.quantize_fp8(jnp.ones((2, H), jnp.float32))
    with pytest.raises(ValueError, match=r"rhs must hold one layer's weights \[E, N, K/2\]"):
        w4.grouped_gemm(lhs, scale, w13, jnp.asarray([0, 2, 2, 2, 2], jnp.int32))
    x, ids, tw = jnp.ones((2, H), jnp.bfloat16), jnp.zeros((2, TOP_K), jnp.int32), jnp.ones((2, TOP_K))
    with pytest.raises(ValueError, match=r"w13 must hold one layer's weights"):
        w4.moe(x, ids, tw, w13, w2)


def test_leading_axes_must_match(rng):
    packed = np.zeros((2, E, 16, 64), np.uint8)
    with pytest.raises(ValueError, match=r"scales must have shape \(2, 4, 16, 1\)"):
        w4.W4Weights(packed, np.ones((3, E, 16, 1), np.float32))
    with pytest.raises(ValueError, match=r"packed must be \[\.\.\., E, N, K//2\]"):
        w4.W4Weights(np.zeros((16, 64), np.uint8), np.ones((16, 1), np.float32))


def test_stacked_host_arrays_prepare_on_the_host(rng):
    packed = rng.integers(0, 256, size=(2, E, 32, 64), dtype=np.uint8)
    scales = rng.random((2, E, 32, 1), dtype=np.float32)
    host = w4.W4Weights(packed.view(np.int8), scales).prepare()
    assert isinstance(host.packed, np.ndarray) and host.packed.dtype == np.uint8
    device = w4.W4Weights(jnp.asarray(packed), jnp.asarray(scales)).prepare()
    np.testing.assert_array_equal(host.packed, device.packed)
