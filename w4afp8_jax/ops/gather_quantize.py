"""Step 2: gather token rows into expert order, quantized to fp8."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .. import _backend
from .._validate import (FP8_DTYPE, check_scale, not_differentiable, require_floating, require_integer, require_rank,
                         require_reference_path)
from ..fp8 import dynamic_scale, saturate_to_fp8


def check_positions(positions, num_tokens: int) -> None:
    require_rank("positions", positions, 2)
    require_integer("positions", positions)
    if np.shape(positions)[0] != num_tokens:
        raise ValueError(f"positions must have one row per token ({num_tokens}), got shape {tuple(np.shape(positions))}")


def scatter_rows(values: jax.Array, target: jax.Array, num_rows: int, fill) -> jax.Array:
    """[num_rows, ...] of values' dtype: row target[i] holds values[i]; rows no target names hold
    `fill`, and targets outside [0, num_rows) write nothing."""
    out = jnp.full((num_rows, *values.shape[1:]), fill, values.dtype)
    return out.at[target].set(values, mode="drop")


def to_rows(per_token: jax.Array, positions: jax.Array, fill) -> jax.Array:
    """Per-token values [M, ...] laid out as gather_quantize's rows [M*k, ...]: row
    positions[t, j] holds per_token[t], rows no slot maps to hold `fill`."""
    m, k = positions.shape
    # Dropped slots (-1) scatter out of bounds and are discarded.
    target = jnp.where(positions >= 0, positions, m * k).reshape(-1)
    return scatter_rows(jnp.repeat(per_token, k, axis=0), target, m * k, fill)


def gather_quantize_reference(x: jax.Array, positions: jax.Array, scale: jax.Array) -> jax.Array:
    """scale: a scalar, or one per token [M]. Rows no slot maps to are zero."""
    return to_rows(saturate_to_fp8(x.astype(jnp.float32), scale), positions, 0)


def _gather_quantize_cuda(x: jax.Array, positions: jax.Array, scale: jax.Array) -> jax.Array:
    m, k = positions.shape
    out_type = jax.ShapeDtypeStruct((m * k, x.shape[1]), FP8_DTYPE)
    return _backend.ffi_call("gather_quantize", out_type)(
        x.astype(jnp.bfloat16), positions.astype(jnp.int32), jnp.reshape(scale, (1,)))


def gather_quantize(x, positions, scale=None, *, implementation: str = "auto") -> tuple[jax.Array, jax.Array]:
    """Writes fp8 rows of x in expert order: row positions[t, j] of the result is
    saturate(x[t] / s) with s the scale of token t. Returns (rows [M*k, H] fp8, scale f32:
    [] per tensor, [M*k] per token).

    x: float [M, H] (bf16 on the CUDA path; other float dtypes are cast to bf16 there);
    positions: integer [M, k] from `route`. M, k or H may be 0 (an empty result, no kernel
    launch). scale: static per-tensor f32 scale (>= 2**-126); None for amax / 448 over the
    finite values of x; or "per_token" for one dynamic scale per token, amax / 448 over the
    finite values of its row x[t] (the same clamping: a token with no finite value >= 2**-126
    gets 1), returned per row of the result: the scale of row positions[t, j] is token t's, the
    scale of a row no slot maps to is 1, so the result goes to `grouped_gemm` as lhs_scale as
    it is (`w4afp8_jax.quantize_fp8` gives the rules: +-inf saturates to +-448, NaN stays NaN
    in its own token's rows and no scale sees it).

    Positions outside [0, M*k) are dropped slots and write nothing. Rows that no slot maps to
    (those at or past group_offsets[E] for `route`'s positions) are zero on both paths. If two
    slots name the same row (never the case for `route`'s positions), that row holds one of
    them, unspecified which.
    Raises ValueError / TypeError naming the argument for a wrong rank, dtype or size, a bad
    scale, or scale="per_token" on the CUDA path (its kernel takes one scale per tensor; the
    reference path computes it). Not differentiable (raises TypeError under jax.grad).
    """
    require_rank("x", x, 2)
    require_floating("x", x)
    check_positions(positions, np.shape(x)[0])
    scale, per_token = check_scale("scale", scale)
    impl = _backend.resolve(implementation)
    if per_token:
        require_reference_path("scale", "per-token scales ('per_token')", impl)
    x = not_differentiable("gather_quantize", "x", jnp.asarray(x))
    if scale is not None:
        scale = not_differentiable("gather_quantize", "scale", scale)
    return gather_quantize_unchecked(x, jnp.asarray(positions), scale, impl, per_token=per_token)


def gather_quantize_unchecked(x: jax.Array, positions: jax.Array, scale: jax.Array | None, impl: str, *,
                              per_token: bool = False) -> tuple[jax.Array, jax.Array]:
    """gather_quantize's (rows, scale) for checked arguments and a resolved implementation;
    scale None: dynamic, per tensor or per token."""
    if scale is None:
        scale = dynamic_scale(x.astype(jnp.float32), per_row=per_token)
    m, k = positions.shape
    if m * k * x.shape[1] == 0:  # nothing to write: no kernel launch (static shapes, jit-safe)
        rows = jnp.zeros((m * k, x.shape[1]), FP8_DTYPE)
    elif impl == "cuda":
        rows = _gather_quantize_cuda(x, positions, scale)
    else:
        rows = gather_quantize_reference(x, positions, scale)
    return rows, (to_rows(scale, positions, 1.0) if per_token else scale)
