"""Steps 3 and 5: grouped GEMM of fp8 rows (expert order) by int4 group-scaled weights."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from .. import _backend
from .._validate import (FP8_DTYPE, NO_RULE, check_lhs_scale, int32_offsets, not_differentiable, require_dtype,
                         require_integer, require_rank)
from ..fp8 import row_broadcast
from ..weights import W4Weights, unpack_int4, untile_packed



def is_exact(precision) -> bool:
    """Whether `precision` asks for the exact f32 sum of every K group (docs/numerics.md).

    precision: None or jax.lax.Precision.DEFAULT (or "default", "fastest"): the fastest kernel
    may run, fp8 tensor-core (wgmma) sums inside each 128-wide K group promoted to f32 with the
    group scale, as the seed, DeepGEMM and TensorRT-LLM compute; HIGH or HIGHEST (or their
    strings): the exact f32 sum of every group. As in jax.lax dots, a (lhs, rhs) pair is
    accepted when both entries agree.
    """
    if isinstance(precision, tuple):
        if len(precision) != 2 or is_exact(precision[0]) != is_exact(precision[1]):
            raise ValueError(f"precision pair must name the same precision twice, got {precision!r}")
        return is_exact(precision[0])
    if precision is None:
        return False
    try:
        value = jax.lax.Precision(precision)
    except (TypeError, ValueError):
        raise ValueError(f"precision must be None, a jax.lax.Precision or its name, got {precision!r}") from None
    return value != jax.lax.Precision.DEFAULT


def row_experts(group_offsets: jax.Array, num_rows: int) -> jax.Array:
    """int32 [num_rows]: the expert of each row; E for rows no expert owns (at or past
    group_offsets[E], or before group_offsets[0])."""
    rows = jnp.arange(num_rows, dtype=jnp.int32)
    experts = jnp.searchsorted(group_offsets, rows, side="right") - 1
    num_experts = group_offsets.shape[0] - 1
    return jnp.where(experts < 0, num_experts, experts).astype(jnp.int32)


def _tile_rows(num_rows: int, num_experts: int) -> int:
    """Rows per reference step: each step unpacks one expert's weights (costing about one
    row's worth of work) and multiplies up to T rows, so minimise steps * (1 + T)."""
    def cost(t):
        return _num_pairs(num_rows, num_experts, t) * (1 + t)
    return min((2 ** i for i in range(10)), key=cost)


def _num_pairs(num_rows: int, num_experts: int, tile: int) -> int:
    # A (tile, expert) pair starts at every tile start and at every expert change inside a
    # tile; expert changes number at most min(E, R) - 1, and pairs never outnumber rows.
    tiles = math.ceil(num_rows / tile)
    return min(num_rows, tiles + min(num_experts, num_rows) - 1)


def grouped_gemm_reference(lhs: jax.Array, lhs_scale: jax.Array, rhs: W4Weights,
                           group_offsets: jax.Array) -> jax.Array:
    """out[r, n] = a_r * sum_g scales[e, n, g] * sum_{k in g} lhs[r, k] * w[e, n, k], f32, with
    a_r = lhs_scale (a scalar) or lhs_scale[r] (one per row).

    Rows are processed in (tile, expert) pairs so the cost stays near R * N * K however the
    rows are spread over experts.
    """
    rhs = rhs.selected()
    num_rows, k = lhs.shape
    num_experts, n, _ = rhs.packed.shape
    gs = rhs.group_size
    groups = k // gs
    tile = _tile_rows(num_rows, num_experts)
    padded = math.ceil(num_rows / tile) * tile
    num_pairs = _num_pairs(num_rows, num_experts, tile)

    experts = row_experts(ordered_offsets(group_offsets, num_rows), padded)
    rows = jnp.arange(padded)
    starts_pair = (experts < num_experts) & ((rows % tile == 0) | (experts != jnp.roll(experts, 1)))
    (pair_rows,) = jnp.nonzero(starts_pair, size=num_pairs, fill_value=padded)
    lhs_f32 = jnp.pad(lhs.astype(jnp.float32), ((0, padded - num_rows + tile), (0, 0)))
    experts = jnp.pad(experts, (0, tile), constant_values=num_experts)

    def step(out, pair_row):
        tile_start = (pair_row // tile) * tile
        expert = experts[jnp.minimum(pair_row, padded)]
        x = jax.lax.dynamic_slice_in_dim(lhs_f32, tile_start, tile).reshape(tile, groups, gs)
        packed = rhs.packed[jnp.minimum(expert, num_experts - 1)]
        if rhs.layout == "tiled":
            packed = untile_packed(packed)
        w = unpack_int4(packed).astype(jnp.float32)
        partial = jnp.einsum("tgk,ngk->tng", x, w.reshape(n, groups, gs),
                             precision=jax.lax.Precision.HIGHEST)
        y = jnp.sum(partial * rhs.scales[jnp.minimum(expert, num_experts - 1)][None], axis=-1)
        mine = jax.lax.dynamic_slice_in_dim(experts, tile_start, tile) == expert
        current = jax.lax.dynamic_slice_in_dim(out, tile_start, tile)
        return jax.lax.dynamic_update_slice_in_dim(out, jnp.where(mine[:, None], y, current), tile_start, 0), None

    out, _ = jax.lax.scan(step, jnp.zeros((padded + tile, n), jnp.float32), pair_rows)
    return (out[:num_rows] * row_broadcast(lhs_scale)).astype(jnp.bfloat16)


def _grouped_gemm_cuda(lhs, lhs_scale, rhs: W4Weights, group_offsets, *, exact: bool,
                       config: str | None = None) -> jax.Array:
    out_type = jax.ShapeDtypeStruct((lhs.shape[0], rhs.out_features), jnp.bfloat16)
    # A layer() view passes the whole stack and the index: the kernel reads the layer in place.
    index = jnp.zeros((1,), jnp.int32) if rhs.index is None else jnp.reshape(rhs.index, (1,))
    _, n, half_k = rhs.packed.shape[-3:]
    return _backend.ffi_call("grouped_gemm", out_type)(
        lhs,                                        # fp8 [R, K], rows in expert order
        jnp.reshape(lhs_scale, (1,)),               # f32 [1]
        jnp.reshape(rhs.packed, (-1, n, half_k)),   # uint8 [L * E, N, K/2]
        jnp.reshape(rhs.scales, (-1, n, rhs.scales.shape[-1])),  # f32 [L * E, N, K/128]
        index.astype(jnp.int32),                    # int32 [1]: the layer of the stack
        group_offsets,                              # int32 [E+1]
        config=config or "",                # a name from grouped_gemm_configs(); "" = heuristic
        tiled_layout=rhs.layout == "tiled",
        exact=bool(exact))


def check_lhs_columns(lhs, rhs: W4Weights) -> None:
    """lhs [R, K] against rhs [E, N, K]; the hint covers weights oriented as jax.lax.ragged_dot's
    rhs, the natural mistake when coming from it."""
    k = np.shape(lhs)[1]
    if k != rhs.in_features:
        transposed = rhs.out_features == k
        raise ValueError(f"lhs has K = {k} columns but rhs expects K = {rhs.in_features}" + (
            " (rhs looks transposed: W4Weights are stored [E, N, K] (N-major, like checkpoints), not "
            "jax.lax.ragged_dot's [G, K, N]; quantize the transposed weights)" if transposed else ""))


def check_grouped_gemm_args(lhs, rhs, group_offsets) -> None:
    require_rank("lhs", lhs, 2)
    require_dtype("lhs", lhs, FP8_DTYPE)
    if not isinstance(rhs, W4Weights):
        raise TypeError(f"rhs must be a W4Weights, got {type(rhs).__name__}")
    rhs.require_one_set("rhs")
    check_lhs_columns(lhs, rhs)
    require_rank("group_offsets", group_offsets, 1)
    require_integer("group_offsets", group_offsets)
    if np.shape(group_offsets)[0] != rhs.num_experts + 1:
        raise ValueError(f"group_offsets must have E+1 = {rhs.num_experts + 1} entries, "
                         f"got {np.shape(group_offsets)[0]}")


def weights_not_differentiable(op: str, name: str, w: W4Weights) -> W4Weights:
    """w with its scales guarded by `not_differentiable` (packed bytes are integers)."""
    scales = not_differentiable(op, f"{name}.scales", w.scales, NO_RULE)
    return w if scales is w.scales else dataclasses.replace(w, scales=scales)


def ordered_offsets(group_offsets: jax.Array, num_rows: int) -> jax.Array:
    """The offsets grouped_gemm computes with: clipped into [0, R], then made non-decreasing by
    a running maximum. Offsets from `route` are unchanged by this. The CUDA kernels apply the
    same rule on the device (ffi_cuda/grouped_gemm/schedule.cuh); the reference applies it here."""
    return jax.lax.cummax(jnp.clip(group_offsets, 0, num_rows))


def grouped_gemm(lhs, lhs_scale, rhs: W4Weights, group_offsets, *, precision=None,
                 implementation: str = "auto", config: str | None = None) -> jax.Array:
    """bf16 [R, N]: rows group_offsets[e]..group_offsets[e+1] of fp8 lhs [R, K] times expert
    e's int4 weights, times lhs_scale (docs/numerics.md, steps 3 and 5).

    lhs: fp8 e4m3 [R, K] (R = 0 gives [0, N] without a kernel launch); lhs_scale: the f32
    scale lhs was quantized with (>= 2**-126): a scalar, or one per row, f32 [R] (as
    `gather_quantize` and `silu_mul_quantize` return them with scale="per_token"; row r's
    output is multiplied by lhs_scale[r]; a size-1 array is a scalar); rhs: W4Weights
    [E, N, K/2] (host or device arrays); group_offsets: integer [E+1], as `route` produces them.

    Any group_offsets are safe and give a defined result: they are clipped into [0, R] and made
    non-decreasing by a running maximum (`ordered_offsets`; route's offsets are unchanged by
    it); expert e then owns rows [o[e], o[e+1]), and rows no expert owns (before o[0], or at or
    past o[E]) come out as zeros.

    precision (see `is_exact`): DEFAULT lets the CUDA path use Hopper's fp8 wgmma tensor cores
    when experts average enough rows (prefill); wgmma adds the products of one K = 32
    instruction with about 14 bits of alignment precision, so the result differs from the
    exact f32 group sums by a normwise ~1e-3 (docs/numerics.md). HIGHEST guarantees the exact
    f32 per-group math. The reference path always computes the exact math.

    config: the name of a CUDA kernel configuration from `w4afp8_jax.grouped_gemm_configs()`
    to force (tuning and benchmarks); None lets the heuristic choose from the static sizes.
    An unknown name, or an inexact configuration with an exact precision, raises ValueError on
    every path where the CUDA module is installed (so a typo shows on the CPU too); the
    reference path otherwise ignores it.

    Not differentiable (jax.grad with respect to lhs, lhs_scale or rhs.scales raises TypeError).
    Raises TypeError / ValueError naming the argument, before any kernel runs, for a wrong rank,
    dtype or size of lhs, rhs or group_offsets (an rhs oriented [E, K, N] is named as such), a
    missing lhs_scale, one of another shape or with a value out of range (a concrete per-row
    one is checked on its device), or a bad config; on the CUDA path also for rhs with a group
    size other than 128 or N not a multiple of 16 (the kernels' layout; the reference path
    takes any even group size and any N), and for per-row scales (the kernels take one scale
    per tensor so far; the reference path computes them).
    """
    check_grouped_gemm_args(lhs, rhs, group_offsets)
    exact = is_exact(precision)
    if lhs_scale is None:
        raise ValueError("lhs_scale is required (the f32 scale lhs was quantized with)")
    impl = _backend.resolve(implementation)
    scale = check_lhs_scale("lhs_scale", lhs_scale, np.shape(lhs)[0], impl)
    scale = not_differentiable("grouped_gemm", "lhs_scale", scale, NO_RULE)
    check_kernel_layout("rhs", rhs, impl)
    if config is not None and _backend.grouped_gemm_configs():
        _backend.check_gemm_config("config", config, exact=exact)
    lhs = not_differentiable("grouped_gemm", "lhs", jnp.asarray(lhs), NO_RULE)
    rhs = weights_not_differentiable("grouped_gemm", "rhs", rhs)
    group_offsets = int32_offsets(group_offsets, lhs.shape[0])
    return grouped_gemm_unchecked(lhs, scale, rhs, group_offsets, exact=exact, impl=impl, config=config)


def check_kernel_layout(name: str, weights: W4Weights, impl: str) -> None:
    """Raise ValueError naming `name` when the CUDA path (impl == "cuda") cannot take these
    weights: its kernels need group size 128 and N a multiple of 16 (ffi_cuda/kernel_limits.h);
    the reference path takes any even group size and any N."""
    if impl != "cuda":
        return
    limits = _backend.limits()
    if weights.group_size != limits.group_size:
        raise ValueError(f"{name}.group_size must be {limits.group_size} on the CUDA path, got {weights.group_size} "
                         "(implementation='reference' takes any even group size)")
    if weights.out_features % limits.row_alignment:
        raise ValueError(f"{name}: N = {weights.out_features} output features must be a multiple of "
                         f"{limits.row_alignment} on the CUDA path (implementation='reference' takes any N)")


def grouped_gemm_unchecked(lhs: jax.Array, lhs_scale: jax.Array, rhs: W4Weights, group_offsets: jax.Array, *,
                           exact: bool, impl: str, config: str | None = None) -> jax.Array:
    """grouped_gemm for checked arguments (config included), int32 offsets and a resolved
    implementation."""
    rhs = jax.tree.map(jnp.asarray, rhs)  # host (numpy) weights, e.g. closed over under jit
    if lhs.shape[0] * rhs.out_features == 0:  # no rows: no kernel launch (static shapes, jit-safe)
        return jnp.zeros((lhs.shape[0], rhs.out_features), jnp.bfloat16)
    if impl == "cuda":
        if rhs.index is None and isinstance(rhs.packed, jax.core.Tracer):
            _backend.warn_if_weight_slices_copied()
        return _grouped_gemm_cuda(lhs, lhs_scale, rhs, group_offsets, exact=exact, config=config)
    return grouped_gemm_reference(lhs, lhs_scale, rhs, group_offsets)
