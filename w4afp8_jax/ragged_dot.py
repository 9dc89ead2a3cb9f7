"""`ragged_dot`: jax.lax.ragged_dot's contract on W4AFP8 operands (fp8 rows, int4 weights)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from . import _backend
from ._validate import (FP8_DTYPE, NO_RULE, QUANTIZED, check_lhs_scale, check_scale, not_differentiable,
                        require_floating, require_integer, require_rank, require_reference_path)
from .fp8 import dynamic_scale, saturate_to_fp8
from .ops.grouped_gemm import check_lhs_columns, grouped_gemm, weights_not_differentiable
from .weights import W4Weights

OUTPUT_DTYPES = (jnp.bfloat16, jnp.float32)


def ragged_dot(lhs, rhs: W4Weights, group_sizes, *, precision=None, preferred_element_type=jnp.bfloat16,
               lhs_scale=None, implementation: str = "auto") -> jax.Array:
    """Grouped matmul with jax.lax.ragged_dot's contract: out[r] = lhs[r] @ rhs[g].T for the
    rows r of group g, groups laid out consecutively with sizes `group_sizes`.

    lhs: [M, K], fp8 e4m3 (then `lhs_scale`, the f32 scale it was quantized with, is required:
        a scalar, or one per row [M]; lhs means lhs * lhs_scale) or bf16 / f16 / f32, quantized
        here to fp8: q = saturate(lhs / lhs_scale) with the given static per-tensor f32 scale;
        with the dynamic scale amax / 448 over the rows that belong to a group when lhs_scale is
        None; or with lhs_scale="per_token", one dynamic scale per row, amax / 448 over the
        row's finite values (`w4afp8_jax.quantize_fp8`'s rules; padding rows get their own).
    rhs: W4Weights [G, N, K], one int4 matrix per group. Note the orientation: jax.lax.ragged_dot
        takes rhs [G, K, N]; W4Weights are stored N-major as checkpoints store them, so
        `lax.ragged_dot(x, w, gs)` becomes `ragged_dot(x, W4Weights for w.transpose(0, 2, 1), gs)`.
    group_sizes: integer [G], non-negative, sum(group_sizes) <= M. Rows at or past
        sum(group_sizes) are padding and come out as zeros (as in jax.lax.ragged_dot). Concrete
        sizes that break this raise ValueError; traced ones cannot be checked and give
        `grouped_gemm`'s result for the offsets [0, cumsum(group_sizes)] (clipped into [0, M]
        and made non-decreasing).
    precision: None / DEFAULT lets the CUDA path use Hopper's fp8 tensor-core accumulation
        where it is faster (normwise ~1e-3 from the exact sums); HIGHEST asks for the exact f32
        sum of every 128-wide K group (see `grouped_gemm`).
    preferred_element_type: bfloat16 (default) or float32. The sums are f32 but the result is
        rounded to bf16 (the kernels' output); float32 returns those bf16 values widened.
    implementation: "auto", "cuda" or "reference" (see `grouped_gemm`).

    Raises TypeError / ValueError naming the argument for bad ranks, dtypes, sizes and scales
    (before any kernel runs; an rhs oriented [G, K, N] is named as such; a per-row [M] scale with
    a float lhs, whose static scales are per tensor; "per_token" with an fp8 lhs; per-row and
    per-token scales on the CUDA path, whose kernels take one scale per tensor so far), and
    TypeError when differentiated with respect to lhs, lhs_scale or rhs.scales (the fp8
    quantization is piecewise constant and the kernels have no derivative rule).

    Returns [M, N] of preferred_element_type. Matches jax.lax.ragged_dot(lhs * lhs_scale,
    rhs.dequantize().transpose(0, 2, 1), group_sizes) up to the fp8 quantization of a float lhs
    and the bf16 rounding of the result. Same positional signature as jax.lax.ragged_dot, so it
    can stand in for it (e.g. as an implementation callable of a ragged_dot dispatcher); the
    TPU-only group_offset argument is not supported.
    """
    require_rank("lhs", lhs, 2)
    require_floating("lhs", lhs)
    if not isinstance(rhs, W4Weights):
        raise TypeError(f"rhs must be a W4Weights [G, N, K], got {type(rhs).__name__}")
    rhs.require_one_set("rhs")
    check_lhs_columns(lhs, rhs)  # before lhs is quantized
    require_rank("group_sizes", group_sizes, 1)
    require_integer("group_sizes", group_sizes)
    if np.shape(group_sizes)[0] != rhs.num_experts:
        raise ValueError(f"group_sizes must have one entry per group of rhs ({rhs.num_experts}), "
                         f"got shape {tuple(np.shape(group_sizes))}")
    out_dtype = jnp.dtype(preferred_element_type if preferred_element_type is not None else jnp.bfloat16)
    if out_dtype not in [jnp.dtype(d) for d in OUTPUT_DTYPES]:
        raise ValueError(f"preferred_element_type must be bfloat16 or float32, got {out_dtype}")
    if not isinstance(group_sizes, jax.core.Tracer):
        concrete = np.asarray(group_sizes)
        if np.any(concrete < 0):
            raise ValueError(f"group_sizes must be non-negative, got {concrete.tolist()}")
        total = int(concrete.sum(dtype=np.int64))
        if total > np.shape(lhs)[0]:
            raise ValueError(f"group_sizes must sum to at most the {np.shape(lhs)[0]} rows of lhs, got sum {total}")
    fp8_lhs = jnp.asarray(lhs).dtype == FP8_DTYPE
    impl = _backend.resolve(implementation)
    per_token = False
    if fp8_lhs:
        if lhs_scale is None or isinstance(lhs_scale, str):
            raise ValueError(f"lhs_scale is required with an fp8 lhs (the f32 scale lhs was quantized with: a scalar "
                             f"or one per row), got {lhs_scale!r}")
        scale = check_lhs_scale("lhs_scale", lhs_scale, np.shape(lhs)[0], impl)
    else:
        if np.size(lhs_scale) > 1:
            raise ValueError(f"lhs_scale of shape {tuple(np.shape(lhs_scale))}: a float lhs is quantized with a static "
                             'per-tensor scale, None (dynamic per tensor) or "per_token" (dynamic per row)')
        scale, per_token = check_scale("lhs_scale", lhs_scale)
        if per_token:
            require_reference_path("lhs_scale", "per-token scales ('per_token')", impl)
    lhs = not_differentiable("ragged_dot", "lhs", jnp.asarray(lhs), NO_RULE if fp8_lhs else QUANTIZED)
    if scale is not None:
        scale = not_differentiable("ragged_dot", "lhs_scale", scale)
    rhs = weights_not_differentiable("ragged_dot", "rhs", rhs)
    sizes = jnp.asarray(group_sizes).astype(jnp.int32)
    group_offsets = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(sizes)])

    if fp8_lhs:
        q = lhs
    else:
        x = lhs.astype(jnp.float32)
        if per_token:
            scale = dynamic_scale(x, per_row=True)
        elif scale is None:
            # Padding rows must not set the scale of the real ones.
            valid = jnp.arange(x.shape[0]) < group_offsets[-1]
            scale = dynamic_scale(jnp.where(valid[:, None], x, 0.0))
        q = saturate_to_fp8(x, scale)
    out = grouped_gemm(q, scale, rhs, group_offsets, precision=precision, implementation=impl)
    return out.astype(out_dtype)
