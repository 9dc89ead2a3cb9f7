"""grouped_gemm (steps 3 and 5): one case list on every implementation.

Reference path against the float64 model. The model computes S = lhs_scale * sum_g s[g] *
sum_k q[k] w[k] in float64 (every int4 * fp8 product and every group sum exact; the scale
products round at ~1e-16). The reference sums the exact products in f32, scales in f32 and
rounds once to bf16, so
    |ref - S| <= 2^-8 (|S| + d) + d,   d = (K + G + 2) * 2^-24 * A,
where 2^-8 is bf16's unit roundoff, A = the same sum over |terms| (also from the model) and
(K + G + 2) 2^-24 A bounds the f32 accumulation error of any summation order of the K products,
G group terms and two scalings. In practice d is far smaller, so nearly every element is within
one bf16 ulp of S: asserted for >= 99.9% of the elements (at most one outlier for small outputs;
an outlier needs |S| within ~2^9 d of 0, i.e. heavy cancellation).

CUDA path against the reference path, at precision=HIGHEST (the exact kernels): both sum exact
int4 x e4m3 products in f32 and scale group sums in f32; they differ only in f32 summation order
(relative ~1e-6), so after the single bf16 rounding they agree exactly or by one bf16 ulp (a
rounding flip: asserted for >= 99.9%, flips need the sum within ~1e-6 of a rounding boundary),
and the float64 model agrees within half a bf16 ulp plus that f32 noise. Elementwise, rtol 1e-2
holds one flip (<= 2^-7 relative) and atol 1e-3 of the output RMS the two f32 sums' difference
where a sum cancels (a random walk of K roundings: ~sqrt(K) 2^-24 of the terms' RMS, far below).

precision=DEFAULT (the fp8 wgmma kernels: wgmma_128x128 where the heuristic picks it, the TMA
family's tma_64x* when forced by name) is not that math: Hopper's fp8 tensor cores align the 32 products of
one instruction (and the incoming group sum) to the largest with about 14 bits kept, so every
term of an instruction is off by up to one quantum, 2^-13 of the instruction's largest term:
at most 4 * 33 quanta per group (< 2^-5.9 of its sum of |terms|, the worst case), and in the
mean-square sum 4 * 33 / 3 quanta^2 (truncation errors uniform in one quantum, their signs the
terms' signs, independent). With ~0.1% activation outliers (100x) an instruction holding one
has a quantum ~100x the ordinary products' (7 bits fewer for them). Measured on the H100:
normwise error 8.2e-4 to 8.5e-4, worst element 0.04-0.14 of the output RMS (K = 512 is worst:
fewer slices to average), 99.2-99.7% within one bf16 ulp. numpy_model.grouped_gemm_wgmma, this
rule with truncation, gives the same on the same data (8.4e-4 to 9.5e-4, 0.02-0.075 RMS,
99.15-99.74%; without outliers 4.5e-4 to 5e-4 and 0.015 RMS): the measured errors are this
arithmetic. Bounds: normwise 2e-3 and elementwise 0.25 RMS, about twice the worst measured
and emulated (test_default_precision_bounds_cover_the_wgmma_model checks them against the model,
which fails them on the outlier data with 2 bits fewer). A wrong operand layout, slice or scale
gives errors of order 1 and fails both. On the seed's own test data (no outliers: activations
randn, weights randint(-8, 8), scales randn * 0.005, outputs of RMS ~0.023 sqrt(K)) the errors
are those of the no-outlier model, ~5e-4 normwise, so the seed's own bound (rtol 1e-2, atol 0.1
on the bf16 outputs) holds with a wide margin; with the outliers it does not (0.14 RMS is ~0.25
absolute at K = 512).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import numpy_model as ref
import w4afp8_jax as w4
from helpers import (EVERY_IMPLEMENTATION, bf16_ulps, float64_rows, int4_weights, offsets_from_counts,
                     on_every_implementation, run_poisoned, w4_weights)
from w4afp8_jax.shapes import DEEPSEEK_V3, DEEPSEEK_V3_TP4

HIGHEST = jax.lax.Precision.HIGHEST
BF16_ULP = 2.0**-7  # spacing of bf16 values in [1, 2)
DS, TP4 = DEEPSEEK_V3, DEEPSEEK_V3_TP4


def make_lhs(rng, rows, k, outliers=True, per_row=False):
    """(fp8 activations on the device, their f32 scale): quantized with a dynamic scale on the
    host (the model's quantize_fp8, bit-identical to the library's), so the device holds only
    the fp8 rows (the f32 ones are 1.9 GB at 65536 x 7168); with ~0.1% outliers (100x) by
    default. per_row: rows of sizes spread over e^-3..e^3, each with its own scale (f32 [rows])."""
    x = rng.standard_normal((rows, k)).astype(np.float32)
    if outliers:
        x[rng.random((rows, k)) < 0.001] *= 100.0
    if per_row:
        x *= np.exp(rng.uniform(-3, 3, size=(rows, 1))).astype(np.float32)
    q, scale = ref.quantize_fp8(x, per_row=per_row)
    return jnp.asarray(q), scale


def make_counts(rng, spec, e):
    """(rows per expert [E], rows past group_offsets[E]) for a case's counts spec."""
    if not isinstance(spec, str):
        counts, extra = spec
        return np.asarray(counts), extra
    if spec.startswith("spread"):  # `rows` rows, a random number of them kept, on random experts
        rows = int(spec.removeprefix("spread"))
        used = rng.integers(0, rows + 1)
        return np.bincount(rng.integers(0, e, size=used), minlength=e), rows - used
    if spec.startswith("random"):  # up to N rows per expert, none past the end
        return rng.integers(0, int(spec.removeprefix("random")) + 1, size=e), 0
    if spec == "decode1":  # B = 1 token, top-8
        counts = np.zeros(e, np.int64)
        counts[rng.choice(e, 8, replace=False)] = 1
        return counts, 0
    if spec == "decode4":
        return np.bincount(rng.integers(0, e, size=32), minlength=e), 0
    if spec == "uniform256":
        return np.full(e, 256), 0
    raise ValueError(spec)


def gemm(implementation, precision=HIGHEST, config=None):
    return jax.jit(lambda a, s, w, o: w4.grouped_gemm(a, s, w, o, precision=precision, config=config,
                                                      implementation=implementation))


REFERENCE_ROWS = 8192


def reference(lhs, lhs_scale, weights, offsets):
    """The reference path as f32 NumPy. On the default device (the GPU in the cuda tests): the
    GEMM has no division or exp, and XLA's f32 dot at HIGHEST is the same math everywhere. In
    blocks of REFERENCE_ROWS rows, each with the offsets shifted and clipped to it (rows are
    independent), so the reference's f32 copy of lhs stays at 0.47 GB (K = 7168) instead of
    3.8 GB for the 65536 rows of the largest cases."""
    offsets = np.asarray(offsets, np.int64)
    blocks = []
    for lo in range(0, max(lhs.shape[0], 1), REFERENCE_ROWS):
        hi = min(lo + REFERENCE_ROWS, lhs.shape[0])
        block_offsets = jnp.asarray(np.clip(offsets - lo, 0, hi - lo).astype(np.int32))
        blocks.append(np.asarray(w4.grouped_gemm(lhs[lo:hi], lhs_scale, weights, block_offsets,
                                                 implementation="reference").astype(jnp.float32)))
    return np.concatenate(blocks)


def check_against_model(got, lhs, lhs_scale, weights, offsets):
    """The reference path's bound against the float64 model (see the top)."""
    got = np.asarray(got)
    assert got.dtype == ref.BF16 and got.shape == (lhs.shape[0], weights.out_features)
    got = got.astype(np.float64)
    gs = weights.group_size
    want, absum = ref.grouped_gemm(np.asarray(lhs), lhs_scale, np.asarray(weights.checkpoint_packed()),
                                   np.asarray(weights.scales), np.asarray(offsets), gs, with_abs=True)
    k = lhs.shape[1]
    d = (k + k // gs + 2) * 2.0**-24 * absum
    err = np.abs(got - want)
    assert np.all(err <= 2.0**-8 * (np.abs(want) + d) + d), np.max(err - 2.0**-8 * (np.abs(want) + d) - d)
    outliers = int(np.sum(err > ref.bf16_ulp(want)))
    assert outliers <= max(1, 0.001 * err.size), f"{outliers} of {err.size} elements beyond 1 bf16 ulp"
    # Rows at or past offsets[E] are exactly zero.
    assert np.all(got[int(offsets[-1]):] == 0)


def check_against_reference(rng, got, lhs, lhs_scale, weights, offsets):
    """The exact CUDA kernels' bound against the reference path and sampled float64 rows."""
    got = np.asarray(got)
    assert got.dtype == ref.BF16 and got.shape == (lhs.shape[0], weights.out_features)
    got = got.astype(np.float32)
    want = reference(lhs, lhs_scale, weights, offsets)
    assert np.all(np.isfinite(got)), "unwritten (NaN-poisoned) or non-finite outputs"
    kept = int(offsets[-1])
    assert np.all(got[kept:] == 0), "rows past group_offsets[E] must be zero"
    if kept:
        within = np.mean(bf16_ulps(got[:kept], want[:kept]) <= 1)
        assert within >= 0.999, f"only {within:.5f} within 1 bf16 ulp"
    scale_of_out = np.sqrt(np.mean(want[:kept] ** 2)) if kept else 1.0
    np.testing.assert_allclose(got[:kept], want[:kept], rtol=1e-2, atol=1e-3 * scale_of_out)

    rows = lhs.shape[0]
    sample = rng.choice(rows, size=min(rows, 48), replace=False)
    exact = float64_rows(lhs, lhs_scale, weights, offsets, sample)
    np.testing.assert_allclose(got[sample], exact, rtol=BF16_ULP, atol=1e-3 * scale_of_out)


def check(implementation, rng, got, lhs, lhs_scale, weights, offsets):
    if implementation == "reference":
        check_against_model(got, lhs, lhs_scale, weights, offsets)
    else:
        check_against_reference(rng, got, lhs, lhs_scale, weights, offsets)


def assert_default_precision_close(got, want, seed_data=False):
    """precision=DEFAULT's bounds (see the top); seed_data adds the seed's own rtol / atol."""
    rms = np.sqrt(np.mean(want**2))
    normwise = np.linalg.norm(got - want) / np.linalg.norm(want)
    worst = np.max(np.abs(got - want)) / rms
    print(f"precision DEFAULT: normwise error {normwise:.2e}, max |error| / RMS {worst:.2e}, "
          f"within 1 bf16 ulp {np.mean(bf16_ulps(got, want) <= 1):.5f}")
    assert normwise <= 2e-3 and worst <= 0.25
    if seed_data:
        np.testing.assert_allclose(got, want, rtol=1e-2, atol=0.1)


# ---------------------------------------------------------------------------------------------
# The case list: (E, N, K, counts). counts: a spec for `make_counts`, or (rows per expert, rows
# past group_offsets[E]). Small problems first (the reference path runs them on the CPU), then
# DeepSeek-V3 shapes (decode to prefill) for the CUDA path.
# ---------------------------------------------------------------------------------------------
CASES = [
    pytest.param(1, 16, 128, "spread5", id="e1-n16-k128-spread5"),
    pytest.param(1, 48, 1024, "spread64", id="e1-n48-k1024-spread64"),
    pytest.param(2, 32, 256, "spread17", id="e2-n32-k256-spread17"),
    pytest.param(2, 16, 128, "spread200", id="e2-n16-k128-spread200"),
    pytest.param(8, 48, 384, "spread64", id="e8-n48-k384-spread64"),
    pytest.param(8, 16, 256, "spread1000", id="e8-n16-k256-spread1000"),
    pytest.param(256, 16, 128, "spread300", id="e256-n16-k128-spread300"),
    pytest.param(256, 32, 256, "spread8", id="e256-n32-k256-spread8"),
    pytest.param(256, 16, 128, "spread2048", id="e256-n16-k128-spread2048"),
    pytest.param(1, 256, 128, ([1], 0), id="e1-n256-k128-one_row"),
    pytest.param(2, DS.hidden, 256, ([3, 0], 2), id="e2-n7168-k256-empty_expert"),
    pytest.param(8, TP4.intermediate, DS.hidden, "random20", id="e8-n512-k7168-random20"),
    # A single hot expert with a dropped tail.
    pytest.param(8, *TP4.gemm1(), ([0, 0, 0, 2048, 0, 0, 0, 0], 5), id="e8-n1024-k7168-hot2048"),
    pytest.param(8, *DS.gemm2(), "random300", id="e8-n7168-k2048-random300"),
    pytest.param(8, *DS.gemm1(), ([17, 0, 1, 64, 0, 0, 130, 9], 0), id="e8-n4096-k7168-mixed"),
    pytest.param(TP4.experts, *TP4.gemm1(), "decode1", id="e256-n1024-k7168-decode1"),
    pytest.param(TP4.experts, *TP4.gemm2(), "decode4", id="e256-n7168-k512-decode4"),
    pytest.param(TP4.experts, *TP4.gemm1(), "uniform256", id="e256-n1024-k7168-uniform256"),  # R = 65536
]
LAYOUTS = ("tiled", "checkpoint")


def with_layouts(cases):
    """Every case in both weight layouts, except the checkpoint layout of the largest weights
    (covered on the smaller shapes)."""
    return [pytest.param(*c.values, layout, id=f"{c.id}-{layout}") for c in cases for layout in LAYOUTS
            if layout == "tiled" or c.values[0] * c.values[1] * c.values[2] <= 2**31]


def max_rows(e, counts):
    """The most rows a counts spec of `make_counts` can give."""
    if not isinstance(counts, str):
        return sum(counts[0]) + counts[1]
    for prefix, per_expert in (("spread", False), ("random", True)):
        if counts.startswith(prefix):
            return int(counts.removeprefix(prefix)) * (e if per_expert else 1)
    return {"decode1": 8, "decode4": 32, "uniform256": 256 * e}[counts]


def with_row_scales(cases):
    """Every case with one lhs scale (its id unchanged) and with one scale per row (id
    "...-per_row"; the reference path only, until the kernels take them)."""
    return [pytest.param(*c.values, per_row, id=c.id + ("-per_row" if per_row else ""))
            for c in cases for per_row in (False, True)]


def small_on_cpu(e, n, k, counts, layout, per_row=False):
    """The reference path runs the cases that it and the float64 model finish on the CPU in about
    a second: at most 1e7 weights and 1e9 multiply-adds, in the checkpoint layout (the tiled
    layout's equivalence on the reference path is tests/test_layout.py's)."""
    return layout == "checkpoint" and e * n * k <= 1e7 and max_rows(e, counts) * n * k <= 1e9


@pytest.mark.parametrize("implementation,e,n,k,counts,layout,per_row",
                         on_every_implementation(with_row_scales(with_layouts(CASES)), reference=small_on_cpu,
                                                 cuda=lambda *case: not case[-1]))
def test_grouped_gemm(rng, implementation, e, n, k, counts, layout, per_row):
    weights = w4_weights(rng, e, n, k, layout=layout)
    counts, extra = make_counts(rng, counts, e)
    lhs, lhs_scale = make_lhs(rng, int(counts.sum()) + extra, k, per_row=per_row)
    offsets = offsets_from_counts(counts)
    got = run_poisoned(gemm(implementation), lhs, lhs_scale, weights, jnp.asarray(offsets))
    check(implementation, rng, got, lhs, lhs_scale, weights, offsets)


@pytest.mark.parametrize("implementation", EVERY_IMPLEMENTATION)
def test_full_fp8_range(rng, implementation):
    """Every finite fp8 code as lhs, subnormals and +-448 included."""
    weights = w4_weights(rng, 4, 32, 512)
    b = rng.integers(0, 256, size=(50, 512), dtype=np.uint8)
    b[(b & 0x7F) == 0x7F] ^= 1  # 0x7F / 0xFF are NaN in e4m3fn: move to +-448
    lhs, lhs_scale = jnp.asarray(b.view(ref.FP8)), np.float32(np.exp(rng.uniform(-4, 2)))
    offsets = offsets_from_counts(np.bincount(rng.integers(0, 4, size=rng.integers(0, 51)), minlength=4))
    got = gemm(implementation)(lhs, lhs_scale, weights, jnp.asarray(offsets))
    check(implementation, rng, got, lhs, lhs_scale, weights, offsets)


@pytest.mark.parametrize("implementation", EVERY_IMPLEMENTATION)
@pytest.mark.parametrize("rows", [1, 7, 130])
def test_single_hot_expert(rng, implementation, rows):
    e = 256
    counts = np.zeros(e, np.int64)
    hot = int(rng.integers(0, e))
    counts[hot] = rows
    weights = w4_weights(rng, e, 16, 256)
    lhs, s = make_lhs(rng, rows, 256, outliers=False)
    offsets = offsets_from_counts(counts)
    got = gemm(implementation)(lhs, s, weights, jnp.asarray(offsets))
    check(implementation, rng, got, lhs, s, weights, offsets)
    # The same rows through expert `hot` alone (a 1-expert problem) give the same numbers.
    alone = w4.W4Weights(weights.packed[hot:hot + 1], weights.scales[hot:hot + 1])
    got1 = gemm(implementation)(lhs, s, alone, jnp.asarray([0, rows], np.int32))
    check(implementation, rng, got1, lhs, s, alone, np.array([0, rows]))


@pytest.mark.parametrize("implementation", EVERY_IMPLEMENTATION)
def test_empty_experts_and_no_rows(rng, implementation):
    e, rows = 8, 24
    counts = np.zeros(e, np.int64)
    counts[[0, 5]] = [10, 9]  # experts 1-4, 6, 7 empty; rows 19..23 past offsets[E]
    weights = w4_weights(rng, e, 16, 256)
    lhs, s = make_lhs(rng, rows, 256, outliers=False)
    offsets = offsets_from_counts(counts)
    fn = gemm(implementation)
    check(implementation, rng, fn(lhs, s, weights, jnp.asarray(offsets)), lhs, s, weights, offsets)
    # No rows at all: everything is zero (the rows hold random non-zero fp8 data).
    none = np.zeros(e + 1, np.int32)
    got = fn(lhs, s, weights, jnp.asarray(none))
    assert np.all(np.asarray(got).astype(np.float32) == 0)


@pytest.mark.parametrize("implementation", EVERY_IMPLEMENTATION)
def test_lhs_scale_is_applied_linearly(rng, implementation):
    weights = w4_weights(rng, 4, 16, 256)
    lhs, s = make_lhs(rng, 30, 256, outliers=False)
    offsets = jnp.asarray(offsets_from_counts(np.bincount(rng.integers(0, 4, size=25), minlength=4)))
    fn = gemm(implementation)
    a = np.asarray(fn(lhs, s, weights, offsets))
    b = np.asarray(fn(lhs, 4.0 * s, weights, offsets))
    # Scaling by a power of two commutes with every rounding (no overflow here): exact.
    np.testing.assert_array_equal(b.astype(np.float32), 4.0 * a.astype(np.float32))


def test_per_row_lhs_scale_scales_each_row(rng):
    """Row r's output is multiplied by lhs_scale[r]: powers of two commute with every rounding,
    so scaling row r by 2^j_r scales exactly its output row; equal row scales are the scalar
    bit for bit; eagerly and under jit (a traced [R] scale)."""
    weights = w4_weights(rng, 4, 16, 256)
    lhs, s = make_lhs(rng, 30, 256, outliers=False)
    offsets = jnp.asarray(offsets_from_counts(np.bincount(rng.integers(0, 4, size=25), minlength=4)))
    fn = gemm("reference")
    scalar = np.asarray(fn(lhs, s, weights, offsets)).astype(np.float32)
    powers = (2.0 ** rng.integers(-3, 4, size=30)).astype(np.float32)
    for run in (fn, lambda *a: w4.grouped_gemm(*a, implementation="reference")):
        np.testing.assert_array_equal(np.asarray(run(lhs, np.full(30, s, np.float32), weights, offsets)),
                                      scalar.astype(ref.BF16))
        got = np.asarray(run(lhs, s * powers, weights, offsets)).astype(np.float32)
        np.testing.assert_array_equal(got, scalar * powers[:, None])


@pytest.mark.parametrize("implementation", EVERY_IMPLEMENTATION)
def test_under_jit(rng, implementation):
    e = 16
    weights = w4_weights(rng, e, 32, 256)
    fn = gemm(implementation)
    for _ in range(2):  # offsets are data, not shapes: a different routing reuses the compiled function
        lhs, s = make_lhs(rng, 100, 256, outliers=False)
        offsets = offsets_from_counts(np.bincount(rng.integers(0, e, size=rng.integers(0, 101)), minlength=e))
        check(implementation, rng, fn(lhs, jnp.float32(s), weights, jnp.asarray(offsets)), lhs, s, weights, offsets)
    assert fn._cache_size() == 1
    # Static scale baked in as a constant.
    got = jax.jit(lambda q: w4.grouped_gemm(q, float(s), weights, jnp.asarray(offsets), precision=HIGHEST,
                                            implementation=implementation))(lhs)
    check(implementation, rng, got, lhs, s, weights, offsets)


# ---------------------------------------------------------------------------------------------
# Reference path only
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gs,k", [(32, 96), (64, 512), (2, 8)])
def test_other_group_sizes(rng, gs, k):
    """Group sizes other than 128 (the CUDA path rejects them: test_cuda_path_rejects_bad_input)."""
    packed, scales = int4_weights(rng, 4, 8, k, gs)
    weights = w4.W4Weights(jnp.asarray(packed), jnp.asarray(scales), gs)
    lhs, s = make_lhs(rng, 40, k, outliers=False)
    offsets = offsets_from_counts(np.bincount(rng.integers(0, 4, size=rng.integers(0, 41)), minlength=4))
    got = w4.grouped_gemm(lhs, s, weights, jnp.asarray(offsets), implementation="reference")
    check_against_model(got, lhs, s, weights, offsets)


@pytest.mark.parametrize("data", ["outliers", "seed"])
@pytest.mark.parametrize("k,n,rows", [(512, 256, 160), (7168, 64, 64)])
def test_default_precision_bounds_cover_the_wgmma_model(rng, k, n, rows, data):
    """precision=DEFAULT's bounds (assert_default_precision_close) hold for the arithmetic they
    are derived from, numpy_model.grouped_gemm_wgmma, on test_default_precision's kinds of data
    (K = 512 has the worst elements, K = 7168 the most instructions per output)."""
    packed, scales = int4_weights(rng, 2, n, k)
    lhs, scale = make_lhs(rng, rows, k, outliers=data == "outliers")
    lhs, offsets = np.asarray(lhs), np.array([0, rows // 3, rows])
    model = ref.to_bf16(ref.grouped_gemm_wgmma(lhs, scale, packed, scales, offsets)).astype(np.float32)
    exact = ref.to_bf16(ref.grouped_gemm(lhs, scale, packed, scales, offsets, 128)).astype(np.float32)
    assert_default_precision_close(model, exact, seed_data=data == "seed")


def test_rows_before_the_first_offset_are_unowned(rng):
    """group_offsets[0] > 0 breaks route's contract; the reference still leaves those rows zero
    instead of giving them an expert's weights."""
    w = w4.W4Weights(jnp.asarray(rng.integers(0, 256, (2, 16, 64), dtype=np.uint8)),
                     jnp.asarray(rng.random((2, 16, 1), dtype=np.float32) + 0.5))
    lhs, scale = w4.quantize_fp8(jnp.asarray(rng.standard_normal((6, 128)), jnp.float32))
    out = np.asarray(w4.grouped_gemm(lhs, scale, w, jnp.asarray([2, 4, 5], jnp.int32),
                                     implementation="reference").astype(jnp.float32))
    assert np.all(out[:2] == 0) and np.all(out[5] == 0)
    assert np.all(np.any(out[2:5] != 0, axis=1))


# ---------------------------------------------------------------------------------------------
# CUDA path only: kernel configurations, precision, device-side offsets, argument checks
# ---------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("config", [c.name for c in w4.grouped_gemm_configs()])
def test_every_tile_config(rng, config, layout):
    """Each configuration forced by name: exact ones at HIGHEST with the exact bound, inexact
    ones at DEFAULT with its bounds (and refused at HIGHEST)."""
    exact = {c.name: c.exact for c in w4.grouped_gemm_configs()}[config]
    e, n, k = 4, 528, 1024  # N = 33 tiles of 16 rows: partial row blocks for every config
    counts = np.array([5, 0, 300, 17])  # 300: several token tiles of one expert for every config
    weights = w4_weights(rng, e, n, k, layout=layout)
    lhs, scale = make_lhs(rng, int(counts.sum()) + 3, k)
    offsets = jnp.asarray(offsets_from_counts(counts))
    if not exact:
        with pytest.raises(ValueError, match="config"):
            w4.grouped_gemm(lhs, scale, weights, offsets, precision=HIGHEST, config=config, implementation="cuda")
    precision = HIGHEST if exact else None
    got = np.asarray(run_poisoned(gemm("cuda", precision, config), lhs, scale, weights, offsets).astype(jnp.float32))
    want = reference(lhs, scale, weights, offsets)
    assert np.all(got[counts.sum():] == 0)
    if not exact:
        assert_default_precision_close(got, want)
        return
    assert np.mean(bf16_ulps(got, want) <= 1) >= 0.999
    np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-3 * np.sqrt(np.mean(want**2)))


DEFAULT_PRECISION_CASES = [
    pytest.param(8, *TP4.gemm1(), [0, 0, 0, 2048, 0, 0, 0, 0], id="e8-n1024-k7168-hot2048"),  # one hot expert
    pytest.param(8, *DS.gemm2(), [300] * 8, id="e8-n7168-k2048-uniform300"),
    pytest.param(TP4.experts, *TP4.gemm1(), [256] * TP4.experts, id="e256-n1024-k7168-uniform256"),  # B = 8192
    pytest.param(TP4.experts, *TP4.gemm2(), "random64", id="e256-n7168-k512-random64"),  # 64 rows/expert on average
]


@pytest.mark.gpu
@pytest.mark.parametrize("data", ["outliers", "seed"])
@pytest.mark.parametrize("e,n,k,counts", DEFAULT_PRECISION_CASES)
def test_default_precision(rng, e, n, k, counts, data):
    """precision=None (DEFAULT) at prefill sizes: the wgmma kernel, within its bounds (see the
    top); on the seed's data (no outliers) also within the seed's rtol / atol."""
    counts = np.bincount(rng.integers(0, e, size=64 * e), minlength=e) if counts == "random64" else np.asarray(counts)
    weights = w4_weights(rng, e, n, k, layout="tiled")
    lhs, scale = make_lhs(rng, int(counts.sum()) + 3, k, outliers=data == "outliers")
    offsets = jnp.asarray(offsets_from_counts(counts))
    got = np.asarray(run_poisoned(gemm("cuda", precision=None), lhs, scale, weights, offsets).astype(jnp.float32))
    want = reference(lhs, scale, weights, offsets)
    kept = int(counts.sum())
    assert np.all(got[kept:] == 0), "rows past group_offsets[E] must be zero"
    assert_default_precision_close(got[:kept], want[:kept], seed_data=data == "seed")


@pytest.mark.gpu
@pytest.mark.parametrize("e,n,k,counts,layout", with_layouts(CASES))
def test_grouped_gemm_default_precision(rng, e, n, k, counts, layout):
    """precision=None (DEFAULT) on the whole case list, decode included, with whatever kernel the
    heuristic picks (an exact one at decode until the TMA family is measured and picked): within
    DEFAULT's bounds (see the top) of the exact math, rows past group_offsets[E] zero, every
    element written."""
    weights = w4_weights(rng, e, n, k, layout=layout)
    counts, extra = make_counts(rng, counts, e)
    lhs, lhs_scale = make_lhs(rng, int(counts.sum()) + extra, k)
    offsets = offsets_from_counts(counts)
    got = np.asarray(run_poisoned(gemm("cuda", precision=None), lhs, lhs_scale, weights, jnp.asarray(offsets))
                     .astype(jnp.float32))
    kept = int(offsets[-1])
    assert np.all(got[kept:] == 0), "rows past group_offsets[E] must be zero"
    if kept:
        assert_default_precision_close(got[:kept], reference(lhs, lhs_scale, weights, offsets)[:kept])


@pytest.mark.gpu
def test_same_jit_different_routing(rng):
    """Offsets are read on the device: one compiled function, two routings, both right."""
    e, n, k = 16, 256, 512
    weights = w4_weights(rng, e, n, k)
    lhs, scale = make_lhs(rng, 64, k)
    fn = gemm("cuda")
    for counts in (np.bincount(rng.integers(0, e, 64), minlength=e), np.eye(e, dtype=int)[3] * 40):
        offsets = jnp.asarray(offsets_from_counts(counts))
        got = np.asarray(fn(lhs, scale, weights, offsets).astype(jnp.float32))
        want = reference(lhs, scale, weights, offsets)
        assert np.mean(bf16_ulps(got, want) <= 1) >= 0.999
    assert fn._cache_size() == 1


@pytest.mark.gpu
def test_out_of_range_offsets_stay_in_bounds(rng):
    """Offsets beyond [0, R] are clamped on the device: no fault, rows stay finite."""
    e, n, k = 4, 256, 256
    weights = w4_weights(rng, e, n, k)
    lhs, scale = make_lhs(rng, 10, k)
    offsets = jnp.asarray([-5, 3, 1000, 2**30, 2**31 - 1], jnp.int32)
    got = np.asarray(gemm("cuda", None)(lhs, scale, weights, offsets).astype(jnp.float32))
    assert got.shape == (10, n) and np.all(np.isfinite(got))


@pytest.mark.gpu
def test_cuda_path_rejects_bad_input(rng):
    weights = w4_weights(rng, 2, 256, 256)
    lhs, scale = make_lhs(rng, 4, 256)
    offsets = jnp.asarray(offsets_from_counts([2, 2]))
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
    with pytest.raises(ValueError, match="config"):
        w4.grouped_gemm(lhs, scale, weights, offsets, config="no_such_config", implementation="cuda")

