"""Layer-stacked W4Weights ([L, E, N, K/2]): W4Weights.stack, lax.scan and vmap over layers."""

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
    return w4.W4Weights.stack(ws)


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


@pytest.mark.parametrize("num_layers", [1, 2, 3])
@pytest.mark.parametrize("host", [True, False])
def test_stack_any_number_of_layers_host_stays_host(rng, num_layers, host):
    # The documented jax.tree.map(jnp.stack, *per_layer) raised TypeError with 2 layers and
    # NotImplementedError with 3; numpy sets must give a numpy stack (no device memory).
    sets = [w4.W4Weights(rng.integers(0, 256, (E, 16, 64), dtype=np.uint8).view(np.int8),
                         rng.standard_normal((E, 16, 1)).astype(ml_dtypes.bfloat16)) for _ in range(num_layers)]
    if not host:
        sets = [jax.tree.map(jnp.asarray, w) for w in sets]
    stacked = w4.W4Weights.stack(sets)
    assert stacked.packed.shape == (num_layers, E, 16, 64) and stacked.scales.shape == (num_layers, E, 16, 1)
    assert isinstance(stacked.packed, np.ndarray) == host and isinstance(stacked.scales, np.ndarray) == host
    assert (stacked.group_size, stacked.layout, stacked.index) == (128, "checkpoint", None)
    for i, one in enumerate(sets):
        np.testing.assert_array_equal(np.asarray(stacked.packed[i]), np.asarray(one.packed))
        np.testing.assert_array_equal(np.asarray(stacked.layer(i).dequantize()), np.asarray(one.dequantize()))


def test_stack_keeps_static_fields_and_works_under_jit(rng, layers):
    tiled = [w.prepare() for w in layers[0]]
    stacked = w4.W4Weights.stack(tiled)
    assert stacked.layout == "tiled"
    np.testing.assert_array_equal(stacked.dequantize(), stack(layers[0]).dequantize())
    small = [w4.W4Weights(jnp.asarray(rng.integers(0, 256, (E, 16, 64), dtype=np.uint8)),
                          jnp.asarray(rng.standard_normal((E, 16, 4)).astype(np.float32)), 32) for _ in range(2)]
    assert w4.W4Weights.stack(small).group_size == 32
    jitted = jax.jit(lambda ws: w4.W4Weights.stack(ws).dequantize())(small)
    np.testing.assert_array_equal(jitted, w4.W4Weights.stack(small).dequantize())


def test_stack_rejects_mismatched_sets_by_name(rng, layers):
    w13 = layers[0]
    other_gs = w4.W4Weights(w13[0].packed, jnp.repeat(w13[0].scales, 2, axis=-1), 64)
    cases = [
        ([w13[0], other_gs], ValueError, r"layers\[1\]\.group_size is 64, layers\[0\]'s 128"),
        ([w13[0], w13[1].prepare()], ValueError, r"layers\[1\]\.layout is 'tiled', layers\[0\]'s 'checkpoint'"),
        ([w13[0], layers[1][0]], ValueError, r"layers\[1\]\.packed has shape \(4, 256, 64\), layers\[0\]\.packed "
                                             r"\(4, 256, 128\)"),
        ([w13[0], stack(w13).layer(1)], ValueError, r"layers\[1\] is a layer\(\) view of a stack"),
        ([stack(w13)], ValueError, r"layers\[0\] must hold one layer's weights \[E, N, K/2\]"),
        ([w13[0], w13[0].packed], TypeError, r"layers\[1\] must be a W4Weights, got ArrayImpl"),
        (w13[0], TypeError, r"layers must be a sequence of W4Weights \(one per layer\), got W4Weights"),
        ([], ValueError, r"layers must hold at least one W4Weights"),
    ]
    for bad, error, message in cases:
        with pytest.raises(error, match=message):
            w4.W4Weights.stack(bad)


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
