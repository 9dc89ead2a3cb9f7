"""CUDA grouped GEMM (steps 3 and 5) against the reference path and an independent float64 model.

Error bound: both paths sum exact int4 x e4m3 products in f32 and scale group sums in f32;
they differ only in f32 summation order (relative ~1e-6), so after the single bf16 rounding
they agree exactly or by one bf16 ulp (a rounding flip), and the float64 model agrees within
half a bf16 ulp plus that f32 noise.

Fast accumulation (the wgmma configuration) is not that math: Hopper's fp8 tensor cores align
the 32 products of one instruction (and the running sum) to the largest with about 14 bits
kept, so every product in a K slice is off by up to ~2^-13 of the slice's largest term. With
~0.1% activation outliers (100x) a slice holding one loses ~7 more bits for its ordinary
products. Measured on the H100: normwise error 8.2e-4 to 8.5e-4, worst element 0.04-0.14 of
the output RMS (K = 512 is worst: fewer slices to average), 99.2-99.7% within one bf16 ulp.
Bounds: normwise 2e-3 and elementwise 0.25 RMS; a wrong operand layout, slice or scale gives
errors of order 1 and fails both.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import w4afp8_jax as w4
from w4afp8_jax.ops.grouped_gemm import _grouped_gemm_cuda
from w4afp8_jax._backend import _w4afp8_cuda

pytestmark = pytest.mark.gpu

BF16_ULP = 2.0**-7  # spacing of bf16 values in [1, 2)


def make_weights(rng, e, n, k):
    packed = jnp.asarray(rng.integers(0, 256, size=(e, n, k // 2), dtype=np.uint8))
    scales = jnp.asarray((rng.standard_normal((e, n, k // 128)) * 0.005).astype(np.float32))
    return w4.W4Weights(packed, scales)


def make_lhs(rng, rows, k):
    """fp8 activations with outliers, quantized with a dynamic scale."""
    x = rng.standard_normal((rows, k)).astype(np.float32)
    x[rng.random((rows, k)) < 0.001] *= 100.0
    return w4.quantize_fp8(jnp.asarray(x))


def offsets_from_counts(counts):
    return jnp.asarray(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32))


def bf16_ulps(got, want):
    """|got - want| in units of the bf16 spacing at max(|got|, |want|)."""
    mag = np.maximum(np.abs(got), np.abs(want))
    spacing = np.where(mag > 0, 2.0 ** (np.floor(np.log2(np.maximum(mag, 1e-30))) - 7), 1e-30)
    return np.abs(got - want) / spacing


def assert_fast_accumulation_close(got, want):
    rms = np.sqrt(np.mean(want**2))
    normwise = np.linalg.norm(got - want) / np.linalg.norm(want)
    worst = np.max(np.abs(got - want)) / rms
    print(f"fast accumulation: normwise error {normwise:.2e}, max |error| / RMS {worst:.2e}, "
          f"within 1 bf16 ulp {np.mean(bf16_ulps(got, want) <= 1):.5f}")
    assert normwise <= 2e-3 and worst <= 0.25


def run_poisoned(fn, *args):
    """Fills freshly freed device memory of the output's size with NaN first, so the allocator
    hands poisoned memory to the kernel's output and unwritten elements show up."""
    out_shape = jax.eval_shape(fn, *args)
    poison = jnp.full(out_shape.shape, jnp.nan, out_shape.dtype).block_until_ready()
    del poison
    return np.asarray(fn(*args).astype(jnp.float32))


def float64_rows(lhs, lhs_scale, weights, offsets, rows):
    """Independent float64 model for selected rows."""
    packed = np.asarray(weights.checkpoint_packed())
    scales = np.asarray(weights.scales, np.float64)
    q = np.asarray(lhs.astype(jnp.float32), np.float64)
    offs = np.asarray(offsets)
    out = np.zeros((len(rows), packed.shape[1]))
    for i, r in enumerate(rows):
        if r >= offs[-1]:
            continue
        e = np.searchsorted(offs, r, side="right") - 1
        nib = np.stack([packed[e] & 0xF, packed[e] >> 4], axis=-1).reshape(packed.shape[1], -1).astype(np.int64)
        w = np.where(nib >= 8, nib - 16, nib).astype(np.float64)
        w *= np.repeat(scales[e], 128, axis=1)
        out[i] = float(lhs_scale) * (w @ q[r])
    return out


def check_against_references(rng, e, n, k, counts, extra_rows=0, layout="tiled"):
    weights = make_weights(rng, e, n, k)
    if layout == "tiled":
        weights = weights.prepare()
    rows = int(np.sum(counts)) + extra_rows
    lhs, lhs_scale = make_lhs(rng, rows, k)
    offsets = offsets_from_counts(counts)
    cuda = jax.jit(lambda a, s, w, o: w4.grouped_gemm(a, s, w, o, implementation="cuda"))
    got = run_poisoned(cuda, lhs, lhs_scale, weights, offsets)
    want = np.asarray(w4.grouped_gemm(lhs, lhs_scale, weights, offsets, implementation="reference").astype(jnp.float32))

    assert np.all(np.isfinite(got)), "unwritten (NaN-poisoned) or non-finite outputs"
    kept = int(np.sum(counts))
    assert np.all(got[kept:] == 0), "rows past group_offsets[E] must be zero"
    ulps = bf16_ulps(got[:kept], want[:kept])
    assert np.mean(ulps <= 1) >= 0.999, f"only {np.mean(ulps <= 1):.5f} within 1 bf16 ulp"
    scale_of_out = np.sqrt(np.mean(want[:kept] ** 2)) if kept else 1.0
    np.testing.assert_allclose(got[:kept], want[:kept], rtol=1e-2, atol=1e-3 * scale_of_out)

    sample = rng.choice(rows, size=min(rows, 48), replace=False)
    exact = float64_rows(lhs, lhs_scale, weights, offsets, sample)
    np.testing.assert_allclose(got[sample], exact, rtol=BF16_ULP, atol=1e-3 * scale_of_out)


@pytest.mark.parametrize(
    "e,n,k,counts,extra",
    [
        (1, 256, 128, [1], 0),
        (2, 7168, 256, [3, 0], 2),
        (8, 512, 7168, "random20", 0),
        (8, 1024, 7168, [0, 0, 0, 2048, 0, 0, 0, 0], 5),  # a single hot expert, dropped tail
        (8, 7168, 2048, "random300", 0),
        (8, 4096, 7168, [17, 0, 1, 64, 0, 0, 130, 9], 0),
        (256, 1024, 7168, "decode1", 0),
        (256, 7168, 512, "decode4", 0),
        (256, 1024, 7168, "uniform256", 0),  # R = 65536: prefill
    ],
)
@pytest.mark.parametrize("layout", ["tiled", "checkpoint"])
def test_grouped_gemm_matches_references(rng, e, n, k, counts, extra, layout):
    if layout == "checkpoint" and e * n * k > 2**31:
        pytest.skip("the checkpoint layout is covered on the smaller shapes")
    if counts == "random20":
        counts = rng.integers(0, 21, size=e)
    elif counts == "random300":
        counts = rng.integers(0, 301, size=e)
    elif counts == "decode1":  # B = 1 token, top-8
        counts = np.zeros(e, np.int64)
        counts[rng.choice(e, 8, replace=False)] = 1
    elif counts == "decode4":
        counts = np.bincount(rng.integers(0, e, size=32), minlength=e)
    elif counts == "uniform256":
        counts = np.full(e, 256)
    check_against_references(rng, e, n, k, np.asarray(counts), extra, layout)


@pytest.mark.parametrize("layout", ["tiled", "checkpoint"])
@pytest.mark.parametrize("config", range(_w4afp8_cuda.grouped_gemm_num_configs() if _w4afp8_cuda else 0))
def test_every_tile_config(rng, config, layout):
    e, n, k = 4, 528, 1024  # N = 33 tiles of 16 rows: partial row blocks for every config
    counts = np.array([5, 0, 300, 17])  # 300: several token tiles of one expert for every config
    weights = make_weights(rng, e, n, k)
    if layout == "tiled":
        weights = weights.prepare()
    lhs, scale = make_lhs(rng, int(counts.sum()) + 3, k)
    offsets = offsets_from_counts(counts)
    got = run_poisoned(jax.jit(lambda a, s, w, o: _grouped_gemm_cuda(a, s, w, o, config)), lhs, scale, weights, offsets)
    want = np.asarray(w4.grouped_gemm(lhs, scale, weights, offsets, implementation="reference").astype(jnp.float32))
    assert np.all(got[counts.sum():] == 0)
    if not _w4afp8_cuda.grouped_gemm_config_is_exact(config):
        assert_fast_accumulation_close(got, want)
        return
    assert np.mean(bf16_ulps(got, want) <= 1) >= 0.999
    np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-3 * np.sqrt(np.mean(want**2)))


@pytest.mark.parametrize("e,n,k,counts", [
    (8, 1024, 7168, [0, 0, 0, 2048, 0, 0, 0, 0]),  # one hot expert
    (8, 7168, 2048, [300] * 8),
    (256, 1024, 7168, [256] * 256),               # B = 8192 tokens of GEMM1
    (256, 7168, 512, "random64"),                  # uneven, 64 rows per expert on average
])
def test_fast_accumulation(rng, e, n, k, counts):
    """fast_accumulation=True at prefill sizes: the wgmma kernel, within its bound (see top)."""
    counts = np.bincount(rng.integers(0, e, size=64 * e), minlength=e) if counts == "random64" else np.asarray(counts)
    weights = make_weights(rng, e, n, k).prepare()
    lhs, scale = make_lhs(rng, int(counts.sum()) + 3, k)
    offsets = offsets_from_counts(counts)
    fast = jax.jit(lambda a, s, w, o: w4.grouped_gemm(a, s, w, o, implementation="cuda", fast_accumulation=True))
    got = run_poisoned(fast, lhs, scale, weights, offsets)
    want = np.asarray(w4.grouped_gemm(lhs, scale, weights, offsets, implementation="reference").astype(jnp.float32))
    kept = int(counts.sum())
    assert np.all(got[kept:] == 0), "rows past group_offsets[E] must be zero"
    assert_fast_accumulation_close(got[:kept], want[:kept])


def test_fast_accumulation_leaves_decode_exact(rng):
    """Below 64 rows per expert the flag changes nothing: the exact kernels run."""
    e, n, k = 256, 1024, 7168
    weights = make_weights(rng, e, n, k).prepare()
    lhs, scale = make_lhs(rng, 8 * 64, k)
    offsets = offsets_from_counts(np.bincount(rng.integers(0, e, size=8 * 64), minlength=e))
    outs = [np.asarray(jax.jit(lambda a, s, w, o, f=f: w4.grouped_gemm(a, s, w, o, implementation="cuda",
                                                                      fast_accumulation=f))(lhs, scale, weights, offsets))
            for f in (False, True)]
    np.testing.assert_array_equal(outs[0], outs[1])


def test_same_jit_different_routing(rng):
    """Offsets are read on the device: one compiled function, two routings, both right."""
    e, n, k = 16, 256, 512
    weights = make_weights(rng, e, n, k)
    lhs, scale = make_lhs(rng, 64, k)
    fn = jax.jit(lambda a, s, w, o: w4.grouped_gemm(a, s, w, o, implementation="cuda"))
    for counts in (np.bincount(rng.integers(0, e, 64), minlength=e), np.eye(e, dtype=int)[3] * 40):
        offsets = offsets_from_counts(counts)
        got = np.asarray(fn(lhs, scale, weights, offsets).astype(jnp.float32))
        want = np.asarray(w4.grouped_gemm(lhs, scale, weights, offsets, implementation="reference").astype(jnp.float32))
        assert np.mean(bf16_ulps(got, want) <= 1) >= 0.999


def test_out_of_range_offsets_stay_in_bounds(rng):
    """Offsets beyond [0, R] are clamped on the device: no fault, rows stay finite."""
    e, n, k = 4, 256, 256
    weights = make_weights(rng, e, n, k)
    lhs, scale = make_lhs(rng, 10, k)
    offsets = jnp.asarray([-5, 3, 1000, 2**30, 2**31 - 1], jnp.int32)
    got = np.asarray(w4.grouped_gemm(lhs, scale, weights, offsets, implementation="cuda").astype(jnp.float32))
    assert got.shape == (10, n) and np.all(np.isfinite(got))


def test_cuda_path_rejects_bad_input(rng):
    weights = make_weights(rng, 2, 256, 256)
    lhs, scale = make_lhs(rng, 4, 256)
    offsets = offsets_from_counts([2, 2])
    with pytest.raises(ValueError, match="group_size"):
        w4.grouped_gemm(lhs, scale, w4.W4Weights(weights.packed, jnp.repeat(weights.scales, 2, axis=2), 64),
                        offsets, implementation="cuda")
    with pytest.raises(ValueError, match="rhs: N"):
        w4.grouped_gemm(lhs, scale, w4.W4Weights(weights.packed[:, :8], weights.scales[:, :8]), offsets,
                        implementation="cuda")
    with pytest.raises(TypeError, match="lhs"):
        w4.grouped_gemm(lhs.astype(jnp.bfloat16), scale, weights, offsets, implementation="cuda")
    with pytest.raises(ValueError, match="group_offsets"):
        w4.grouped_gemm(lhs, scale, weights, offsets[:2], implementation="cuda")
    with pytest.raises(ValueError, match="lhs"):
        w4.grouped_gemm(lhs[:, :128], scale, weights, offsets, implementation="cuda")
