"""Helpers shared by the op tests (tests/test_<op>.py).

Every op module keeps one case list and runs it on every implementation through
`on_every_implementation`: the reference path always (checked against the float64 model in
tests/numpy_model.py), the CUDA path under the `gpu` mark (checked against the reference path;
conftest.py skips it without a GPU build).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import numpy_model as ref
import w4afp8_jax as w4

IMPLEMENTATIONS = ("reference", "cuda")


def on_every_implementation(cases, *, reference=lambda *values: True, cuda=lambda *values: True):
    """pytest params (implementation, *case values) for `parametrize`: every case on the reference
    path where `reference(*values)` holds (the others are too large for the CPU reference and its
    float64 model; on the device the CUDA check compares them with the reference path), and on
    the CUDA path under the gpu mark where `cuda(*values)` holds (the others use what only the
    reference path supports, e.g. group sizes other than 128). `cases` are pytest.param objects
    with ids; the params' ids read "<implementation>-<case id>"."""
    params = []
    for case in cases:
        if reference(*case.values):
            params.append(pytest.param("reference", *case.values, marks=case.marks, id=f"reference-{case.id}"))
        if cuda(*case.values):
            params.append(pytest.param("cuda", *case.values, marks=[pytest.mark.gpu, *case.marks],
                                       id=f"cuda-{case.id}"))
    return params


# Both implementations, for tests whose arguments are not a case list (the cuda one under gpu).
EVERY_IMPLEMENTATION = [pytest.param("reference"), pytest.param("cuda", marks=pytest.mark.gpu)]


def reference_on_cpu(fn, *args):
    """fn(*args) jitted on the CPU. The reference path defines the numerics there: XLA's fused
    f32 division and exp on the GPU are not correctly rounded, and fp8 requantization turns that
    into whole-code flips (measured: 0.8% relative error of the GPU-jitted MoE reference against
    its own eager run)."""
    return jax.jit(fn)(*jax.device_put(args, jax.devices("cpu")[0]))


def run_poisoned(fn, *args):
    """fn(*args), after filling freshly freed device memory of each floating output's size with
    NaN, so the allocator hands poisoned memory to the kernel's outputs and elements the kernel
    should have written but did not show up (as NaN, or as bytes unlikely to match)."""
    out_shapes = jax.eval_shape(fn, *args)
    poison = [jnp.full(s.shape, jnp.nan, s.dtype) for s in jax.tree.leaves(out_shapes)
              if jnp.issubdtype(s.dtype, jnp.floating)]
    jax.block_until_ready(poison)
    del poison
    return fn(*args)


# ---------------------------------------------------------------------------------------------
# Random problems
# ---------------------------------------------------------------------------------------------
def int4_weights(rng, e, n, k, group_size=128):
    """(packed uint8 [E, N, K/2], scales f32 [E, N, K/group_size]) as NumPy arrays: every int4
    code equally likely (the seed's randint(-8, 8)), scales randn * 0.005 (the seed's)."""
    packed = rng.integers(0, 256, size=(e, n, k // 2), dtype=np.uint8)
    scales = (rng.standard_normal((e, n, k // group_size)) * 0.005).astype(np.float32)
    return packed, scales


def w4_weights(rng, e, n, k, group_size=128, layout="checkpoint"):
    """`int4_weights` as a W4Weights on the device; layout="tiled" prepares them."""
    return on_device(w4.W4Weights(*int4_weights(rng, e, n, k, group_size), group_size), layout)


def on_device(weights, layout="checkpoint"):
    """NumPy W4Weights on the default device, layout="tiled" prepared first: on the host, so the
    device never holds both layouts (1 GB each at E = 256, N = 1024, K = 7168)."""
    return jax.tree.map(jnp.asarray, weights.prepare() if layout == "tiled" else weights)


def offsets_from_counts(counts):
    """int32 group offsets [E + 1] (exclusive prefix sums) of rows-per-expert counts."""
    return np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)


def routed_tokens(rng, m, h, e, k, distinct=True):
    """(x bf16 [M, H] NumPy, topk_ids int32 [M, k], topk_weights f32 [M, k] summing to 1 per
    token); distinct=False lets a token name one expert in several slots."""
    x = rng.standard_normal((m, h)).astype(ref.BF16)
    if distinct:
        ids = np.stack([rng.choice(e, k, replace=False) for _ in range(m)])
    else:
        ids = rng.integers(0, e, size=(m, k))
    weights = rng.random((m, k)).astype(np.float32) + 0.05
    weights /= weights.sum(axis=1, keepdims=True)
    return x, ids.astype(np.int32), weights


# ---------------------------------------------------------------------------------------------
# Comparisons
# ---------------------------------------------------------------------------------------------
def float64_rows(lhs, lhs_scale, weights, group_offsets, rows):
    """float64 [len(rows), N]: the model's grouped GEMM (numpy_model.grouped_gemm) for the
    selected rows of a problem, computed as a smaller problem that holds only those rows (each
    with its expert) so that large problems stay cheap; rows no expert owns come out as 0."""
    offsets = np.asarray(group_offsets, np.int64)
    rows = np.asarray(rows)
    owner = np.searchsorted(offsets, rows, side="right") - 1
    owned = (rows >= offsets[0]) & (rows < offsets[-1])
    owner = np.where(owned, owner, weights.num_experts)  # unowned rows sort last, past every group
    order = np.argsort(owner, kind="stable")
    counts = np.bincount(owner[owned], minlength=weights.num_experts)
    q = np.asarray(lhs)[rows[order]]
    sub = ref.grouped_gemm(q, lhs_scale, np.asarray(weights.checkpoint_packed()), np.asarray(weights.scales),
                           offsets_from_counts(counts), weights.group_size)
    out = np.empty_like(sub)
    out[order] = sub
    return out


def bf16_ulps(got, want):
    """|got - want| in units of the bf16 spacing at max(|got|, |want|)."""
    mag = np.maximum(np.abs(got), np.abs(want))
    spacing = np.where(mag > 0, 2.0 ** (np.floor(np.log2(np.maximum(mag, 1e-30))) - 7), 1e-30)
    return np.abs(got - want) / spacing


def fp8_bytes(x):
    return np.asarray(x).view(np.uint8)


def assert_fp8_close(got, want, max_flip_rate=1e-3):
    """Equal bytes, except rare one-code flips between adjacent fp8 values of the same sign."""
    g, w = fp8_bytes(got).astype(np.int32), fp8_bytes(want).astype(np.int32)
    differ = g != w
    if not differ.any():
        return
    same_sign = (g & 0x80) == (w & 0x80)
    adjacent = same_sign & (np.abs((g & 0x7F) - (w & 0x7F)) == 1)
    assert adjacent[differ].all(), f"non-adjacent fp8 mismatches: {np.count_nonzero(differ & ~adjacent)}"
    assert differ.mean() <= max_flip_rate, f"{differ.sum()} of {differ.size} values flipped"


class Model:
    """The float64 model's layer output `out`, its `intermediates` (numpy_model.moe) and, per
    token, the output rows that one q2 flip would give (tests/test_moe.py's docstring)."""

    def __init__(self, x, ids, weights, p13, s13, p2, s2, gs=128, routed_scaling_factor=1.0, **scales):
        self.out, self.intermediates = ref.moe(x, ids, weights, p13, s13, p2, s2, gs, routed_scaling_factor=routed_scaling_factor,
                                     return_intermediates=True, **scales)
        self._flip_args = (weights, p2, s2, gs, routed_scaling_factor)

    def one_q2_flip(self, token):
        return ref.moe_one_q2_flip(token, self.intermediates, *self._flip_args)


def within_ulp(got, want):
    """The fraction of elements of each row of `got` within one bf16 ulp of `want`."""
    return np.mean(np.abs(got.astype(np.float64) - want.astype(np.float64)) <= ref.bf16_ulp(want), axis=-1)


def row_close(got, want, atol):
    """Per row of `want` (bf16 [..., H]): every element within rtol 1e-2 + atol of it, and >= 98%
    within one bf16 ulp (tests/test_moe.py's docstring)."""
    g, w = got.astype(np.float64), want.astype(np.float64)
    return np.all(np.abs(g - w) <= 1e-2 * np.abs(w) + atol, axis=-1) & (within_ulp(got, want) >= 0.98)


def assert_moe_close(got, model, seed_note=""):
    """The reference path's layer against the model (bounds derived in tests/test_moe.py's docstring)."""
    got, want = np.asarray(got), model.out
    assert got.dtype == ref.BF16 and got.shape == want.shape
    g, w = got.astype(np.float64), want.astype(np.float64)
    assert np.all(np.isfinite(g))
    norm = np.linalg.norm(w)
    if norm == 0:
        assert np.all(g == 0)
        return
    rel = np.linalg.norm(g - w) / norm
    assert rel < 1e-2, f"relative norm error {rel} {seed_note}"
    # Each row as the model has it, or as it has it with one q2 code at its other rounding.
    atol = 0.05 * np.sqrt(np.mean(w**2))
    for token in np.flatnonzero(~row_close(got, want, atol)):
        assert any(row_close(got[token], rows, atol).any() for rows in model.one_q2_flip(token)), (
            f"token {token}: {within_ulp(got[token], want[token]):.4f} of its elements within 1 bf16 ulp of the "
            f"model, max |error| {np.abs(g[token] - w[token]).max():.3g} (atol {atol:.3g}), and no single q2 flip "
            f"explains it {seed_note}")
