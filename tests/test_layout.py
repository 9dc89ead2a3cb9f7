"""The tiled weight layout (W4Weights.prepare) is a pure permutation of the checkpoint bytes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import w4afp8_jax as w4
from w4afp8_jax.weights import tile_packed, untile_packed


def test_prepare_keeps_the_math_and_permutes_bytes(rng):
    packed = jnp.asarray(rng.integers(0, 256, size=(3, 48, 256), dtype=np.uint8))
    scales = jnp.asarray(rng.random((3, 48, 4), dtype=np.float32))
    w = w4.W4Weights(packed, scales)
    tiled = w.prepare()
    assert tiled.layout == "tiled" and tiled.prepare() is tiled
    np.testing.assert_array_equal(tiled.dequantize(), w.dequantize())
    np.testing.assert_array_equal(tiled.checkpoint_packed(), packed)
    np.testing.assert_array_equal(np.sort(np.asarray(tiled.packed).ravel()), np.sort(np.asarray(packed).ravel()))
    assert np.any(np.asarray(tiled.packed) != np.asarray(packed))


def test_tiled_block_is_what_each_mma_lane_reads(rng):
    """Block (tile, group) is 1 KiB: lane 4g+t's 16 bytes of row 8h+g at h*512 + lane*16."""
    e, n, half_k = 2, 32, 192  # 2 tiles, 3 groups
    packed = rng.integers(0, 256, size=(e, n, half_k), dtype=np.uint8)
    tiled = np.asarray(tile_packed(jnp.asarray(packed)))
    np.testing.assert_array_equal(np.asarray(untile_packed(jnp.asarray(tiled))), packed)
    for expert, tile, group, h, g, t in [(0, 0, 0, 0, 0, 0), (1, 1, 2, 1, 7, 3), (0, 1, 1, 0, 5, 2)]:
        block = tiled[expert].reshape(-1)[(tile * 3 + group) * 1024:][:1024]
        want = packed[expert, tile * 16 + 8 * h + g, group * 64 + t * 16:][:16]
        np.testing.assert_array_equal(block[h * 512 + (4 * g + t) * 16:][:16], want)


def test_tiled_reference_gemm_matches_checkpoint(rng):
    w = w4.W4Weights(jnp.asarray(rng.integers(0, 256, size=(2, 32, 128), dtype=np.uint8)),
                     jnp.asarray(rng.random((2, 32, 2), dtype=np.float32) * 0.01))
    lhs, scale = w4.quantize_fp8(jnp.asarray(rng.standard_normal((5, 256)), jnp.float32))
    offsets = jnp.asarray([0, 2, 5], jnp.int32)
    a = w4.grouped_gemm(lhs, scale, w, offsets, implementation="reference")
    b = jax.jit(lambda w: w4.grouped_gemm(lhs, scale, w, offsets, implementation="reference"))(w.prepare())
    np.testing.assert_array_equal(np.asarray(a.astype(jnp.float32)), np.asarray(b.astype(jnp.float32)))


def test_tiled_layout_needs_whole_tiles(rng):
    with pytest.raises(ValueError, match="tiled layout"):
        w4.W4Weights(jnp.zeros((1, 8, 64), jnp.uint8), jnp.ones((1, 8, 1), jnp.float32), 128, "tiled")
    with pytest.raises(ValueError, match="layout"):
        w4.W4Weights(jnp.zeros((1, 16, 64), jnp.uint8), jnp.ones((1, 16, 1), jnp.float32), 128, "rowmajor")


def test_prepare_says_what_the_tiled_layout_needs():
    with pytest.raises(ValueError, match=r"the tiled layout needs N % 16 == 0 and group_size 128, got N = 8"):
        w4.quantize_weights(np.ones((1, 8, 128), np.float32)).prepare()
    with pytest.raises(ValueError, match=r"needs N % 16 == 0 and group_size 128, got N = 16, group_size = 64"):
        w4.quantize_weights(np.ones((1, 16, 128), np.float32), group_size=64).prepare()
