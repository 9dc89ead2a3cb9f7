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


# ---------------------------------------------------------------------------------------------
# The TMA family's operand path (ffi_cuda/grouped_gemm/tma_kernel.cuh), emulated in NumPy: the
# copy engine's swizzled boxes, each lane's two-byte fragment reads (FragmentOffset), the int4 ->
# e4m3 byte permutes (Int4ToE4m3 in operands.cuh) and the wgmma A-fragment layout they must fill.
# The layouts the emulation relies on are the hardware's, as documented: 128-byte swizzle XORs
# 16-byte chunk bits [4, 7) with address bits [7, 10) (64-byte: bits [4, 6) with [7, 9)); the
# register A fragment of m64nNk32 8-bit wgmma gives lane (g, t) of warp w, register r, byte i
# row 16w + g + 8 (r % 2) and K 4t + i + 16 (r // 2) (CUTLASS's ALayout_64x32). The tiled bytes
# come from weights.tile_packed, so the kernel's reading of that layout is checked independently.
# ---------------------------------------------------------------------------------------------
E4M3_OF_INT4 = np.array([0x00, 0x38, 0x40, 0x44, 0x48, 0x4A, 0x4C, 0x4E,  # 0..7
                         0xD0, 0xCE, 0xCC, 0xCA, 0xC8, 0xC4, 0xC0, 0xB8], np.uint8)  # -8..-1


def prmt(a, b, selector):
    """PTX prmt.b32 (default mode) on uint32 scalars."""
    x = int(a) | (int(b) << 32)
    out = 0
    for i in range(4):
        s = (int(selector) >> (4 * i)) & 0xF
        byte = (x >> (8 * (s & 7))) & 0xFF
        if s & 8:
            byte = 0xFF if byte & 0x80 else 0
        out |= byte << (8 * i)
    return out


def int4_to_e4m3(w):
    """The byte permutes of operands.cuh's Int4ToE4m3, step by step."""
    m = 0xFFFFFFFF
    non_neg_lo, non_neg_hi, neg_lo, neg_hi = 0x44403800, 0x4E4C4A48, 0xCACCCED0, 0xB8C0C4C8
    index_lo, index_hi, shifted = w & 0x7777, (w >> 16) & 0x7777, (w << 4) & m
    negative_lo, negative_hi = prmt(shifted, w, 0xD9C8), prmt(shifted, w, 0xFBEA)

    def pick(index, negative):
        return (prmt(non_neg_lo, non_neg_hi, index) & ~negative & m) | (prmt(neg_lo, neg_hi, index) & negative)
    return pick(index_lo, negative_lo), pick(index_hi, negative_hi)


def swizzled_box(box_bytes, swizzle):
    """Shared memory after a bulk tensor copy with `swizzle` (128 or 64) of a box laid out
    contiguously: 16-byte chunk c of 128-byte line L lands at chunk c ^ (L % 8) (128), or chunk
    bits [4, 6) XOR address bits [7, 9) (64)."""
    smem = np.empty_like(box_bytes)
    for address in range(box_bytes.size):
        line, chunk = address >> 7, (address >> 4) & 7
        x = chunk ^ (line & 7) if swizzle == 128 else (chunk & 4) | ((chunk & 3) ^ (line & 3))
        smem[(address & ~0x70) | (x << 4)] = box_bytes[address]
    return smem


def fragment_offset(tiled, warp, lane, h, j):
    """tma_kernel.cuh's FragmentOffset."""
    g, t = lane // 4, lane % 4
    if tiled:
        line = 4 * h + g // 2
        return warp * 1024 + line * 128 + (((4 * (g % 2) + j) ^ line) * 16) + 2 * t
    row = 16 * warp + 8 * h + g
    return row * 64 + ((j ^ ((row >> 1) & 3)) * 16) + 2 * t


@pytest.mark.parametrize("tiled", [True, False])
def test_tma_family_fragments_hold_the_wgmma_a_operand(rng, tiled):
    """For a 64-row unit at a random row block and K group, every lane's A registers after the
    kernel's reads and conversion are the e4m3 bytes the wgmma A layout asks for."""
    n, k = 128, 512  # 8 tiles of 16 rows, 4 groups
    packed = rng.integers(0, 256, size=(n, k // 2), dtype=np.uint8)
    row0, group = 64 * int(rng.integers(0, 2)), int(rng.integers(0, k // 128))
    if tiled:  # 4 tiles of one group: the box [128 B, 8 lines, 1 group, 4 tiles]
        blocks = np.asarray(tile_packed(packed[None]))[0].reshape(n // 16, k // 128, 1024)
        box = blocks[row0 // 16:row0 // 16 + 4, group].reshape(-1)
    else:  # [64 B of the group, 64 rows]
        box = packed[row0:row0 + 64, group * 64:(group + 1) * 64].reshape(-1)
    smem = swizzled_box(box, 128 if tiled else 64)
    values = (packed[row0:row0 + 64, group * 64:(group + 1) * 64, None] >> np.array([0, 4], np.uint8)) & 0xF
    want_bytes = E4M3_OF_INT4[values.reshape(64, 128)]  # [row, K of the group]
    for warp in range(4):
        for lane in range(32):
            g, t = lane // 4, lane % 4
            for j in range(4):
                for h in range(2):
                    off = fragment_offset(tiled, warp, lane, h, j)
                    v = int(smem[off]) | int(smem[off + 1]) << 8 | int(smem[off + 8]) << 16 | int(smem[off + 9]) << 24
                    regs = dict(zip((h, 2 + h), int4_to_e4m3(v)))
                    for r, value in regs.items():
                        row, kk = 16 * warp + g + 8 * (r % 2), 32 * j + 4 * t + 16 * (r // 2)
                        got = np.frombuffer(value.to_bytes(4, "little"), np.uint8)
                        np.testing.assert_array_equal(got, want_bytes[row, kk:kk + 4], err_msg=f"{warp} {lane} {j} {r}")


def test_tma_family_fragment_reads_are_conflict_free():
    """Each of a warp's 16 two-byte fragment reads (per h, j) touches 16 distinct 4-byte words in
    16 distinct banks (lanes t = 0, 1 and t = 2, 3 share a word): one shared-memory wavefront."""
    for tiled in (True, False):
        for h in range(2):
            for j in range(4):
                words = {fragment_offset(tiled, 0, lane, h, j) // 4 for lane in range(32)}
                assert len(words) == 16 and len({w % 32 for w in words}) == 16, (tiled, h, j)
