"""Step 2: gather token rows into expert order, quantized to fp8."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .. import _backend
from .._validate import (FP8_DTYPE, check_static_scale, not_differentiable, require_floating, require_integer,
                         require_rank)
from ..fp8 import dynamic_scale, saturate_to_fp8


def check_positions(positions, num_tokens: int) -> None:
    require_rank("positions", positions, 2)
    require_integer("positions", positions)
    if np.shape(positions)[0] != num_tokens:
        raise ValueError(f"positions must have one row per token ({num_tokens}), got shape {tuple(np.shape(positions))}")


def gather_quantize_reference(x: jax.Array, positions: jax.Array, scale: jax.Array) -> jax.Array:
    m, k = positions.shape
    rows = m * k
    q = saturate_to_fp8(x.astype(jnp.float32), scale)
    # Dropped slots (-1) scatter out of bounds and are discarded; their rows stay zero here.
    target = jnp.where(positions >= 0, positions, rows).reshape(-1)
    source = jnp.repeat(q, k, axis=0)
    return jnp.zeros((rows, x.shape[1]), FP8_DTYPE).at[target].set(source, mode="drop")


def _gather_quantize_cuda(x: jax.Array, positions: jax.Array, scale: jax.Array) -> jax.Array:
    m, k = positions.shape
    out_type = jax.ShapeDtypeStruct((m * k, x.shape[1]), FP8_DTYPE)
    return _backend.ffi_call("gather_quantize", out_type)(
        x.astype(jnp.bfloat16), positions.astype(jnp.int32), jnp.reshape(scale, (1,)))


def gather_quantize(x, positions, scale=None, *, implementation: str = "auto") -> tuple[jax.Array, jax.Array]:
    """Writes fp8 rows of x in expert order: row positions[t, j] of the result is
    saturate(x[t] / scale). Returns (rows [M*k, H] fp8, scale f32 []).

    x: float [M, H] (bf16 on the CUDA path; other float dtypes are cast to bf16 there);
    positions: integer [M, k] from `route`. M, k or H may be 0 (an empty result, no kernel
    launch). scale: static per-tensor f32 scale (>= 2**-126), or None for amax / 448 over the
    finite values of x (`w4afp8_jax.quantize_fp8` gives the rules: +-inf saturates to +-448,
    NaN stays NaN in its own token's rows).

    Positions outside [0, M*k) are dropped slots and write nothing. Rows that no slot maps to
    (those at or past group_offsets[E] for `route`'s positions) are zero on both paths. If two
    slots name the same row (never the case for `route`'s positions), that row holds one of
    them, unspecified which.
    Not differentiable (raises TypeError under jax.grad).
    """
    require_rank("x", x, 2)
    require_floating("x", x)
    check_positions(positions, np.shape(x)[0])
    scale = check_static_scale("scale", scale)
    impl = _backend.resolve(implementation)
    x = not_differentiable("gather_quantize", "x", jnp.asarray(x))
    positions = jnp.asarray(positions)
    if scale is None:
        scale = dynamic_scale(x.astype(jnp.float32))
    else:
        scale = not_differentiable("gather_quantize", "scale", scale)
    return gather_quantize_unchecked(x, positions, scale, impl), scale


def gather_quantize_unchecked(x: jax.Array, positions: jax.Array, scale: jax.Array, impl: str) -> jax.Array:
    """gather_quantize's rows for checked arguments and a resolved implementation."""
    m, k = positions.shape
    if m * k * x.shape[1] == 0:  # nothing to write: no kernel launch (static shapes, jit-safe)
        return jnp.zeros((m * k, x.shape[1]), FP8_DTYPE)
    if impl == "cuda":
        return _gather_quantize_cuda(x, positions, scale)
    return gather_quantize_reference(x, positions, scale)
