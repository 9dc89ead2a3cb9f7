"""Step 4: SiLU(gate) * up on GEMM1's output, requantized to fp8 for GEMM2."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .. import _backend
from .._validate import (FP8_DTYPE, check_static_scale, int32_offsets, not_differentiable, require_dtype,
                         require_integer, require_rank)
from ..fp8 import dynamic_scale, saturate_to_fp8


def silu_mul(c1: jax.Array) -> jax.Array:
    """f32 h = silu(c1[:, :I]) * c1[:, I:], silu(g) = g / (1 + exp(-g))."""
    inter = c1.shape[1] // 2
    gate = c1[:, :inter].astype(jnp.float32)
    up = c1[:, inter:].astype(jnp.float32)
    return gate / (1.0 + jnp.exp(-gate)) * up


def kept_rows_mask(group_offsets: jax.Array, num_rows: int) -> jax.Array:
    """Rows r < group_offsets[E] (any offset value: negative keeps none, past R keeps all)."""
    return jnp.arange(num_rows) < group_offsets[-1]


def kept_silu_mul(c1: jax.Array, group_offsets: jax.Array) -> jax.Array:
    """h for the kept rows (r < group_offsets[E]) and zero elsewhere: what a dynamic scale sees."""
    kept = kept_rows_mask(group_offsets, c1.shape[0])
    return jnp.where(kept[:, None], silu_mul(c1), 0.0)


def silu_mul_quantize_reference(c1: jax.Array, group_offsets: jax.Array, scale: jax.Array) -> jax.Array:
    kept = kept_rows_mask(group_offsets, c1.shape[0])
    q = saturate_to_fp8(silu_mul(c1), scale)
    return jnp.where(kept[:, None], q, jnp.zeros((), FP8_DTYPE))


def _silu_mul_quantize_cuda(c1, group_offsets, scale) -> jax.Array:
    out_type = jax.ShapeDtypeStruct((c1.shape[0], c1.shape[1] // 2), FP8_DTYPE)
    return _backend.ffi_call("silu_mul_quantize", out_type)(
        c1, group_offsets, jnp.reshape(scale, (1,)))


def silu_mul_quantize(c1, group_offsets, scale=None, *, implementation: str = "auto") -> tuple[jax.Array, jax.Array]:
    """fp8 [R, I] = saturate(silu(c1[:, :I]) * c1[:, I:] / scale), f32 math, for the kept rows
    (r < group_offsets[E]); returns (q, scale f32 []). Other rows are zero on both paths.

    c1: bf16 [R, 2I] (GEMM1's output: gate columns, then up columns; R = 0 gives an empty
    result without a kernel launch). group_offsets: integer [E+1]; only its last entry is read,
    and any value is safe (negative: no row kept; past R: every row kept). scale: static f32
    scale (>= 2**-126), or None for amax(|h|) / 448 over the finite h of the kept rows (the
    `w4afp8_jax.quantize_fp8` rules: +-inf saturates, NaN stays in its row; h follows IEEE f32,
    so an infinite c1 can give NaN, e.g. silu(-inf) = -inf / inf). Not differentiable (raises
    TypeError under jax.grad).
    """
    require_rank("c1", c1, 2)
    require_dtype("c1", c1, jnp.bfloat16)
    if np.shape(c1)[1] % 2:
        raise ValueError(f"c1 must have an even number of columns (gate, then up), got {np.shape(c1)[1]}")
    require_rank("group_offsets", group_offsets, 1)
    require_integer("group_offsets", group_offsets)
    if np.shape(group_offsets)[0] < 1:
        raise ValueError("group_offsets must have E+1 >= 1 entries, got shape (0,)")
    scale = check_static_scale("scale", scale)
    impl = _backend.resolve(implementation)
    c1 = not_differentiable("silu_mul_quantize", "c1", jnp.asarray(c1))
    group_offsets = int32_offsets(group_offsets, np.shape(c1)[0])
    if scale is None:
        scale = dynamic_scale(kept_silu_mul(c1, group_offsets))
    else:
        scale = not_differentiable("silu_mul_quantize", "scale", scale)
    return silu_mul_quantize_unchecked(c1, group_offsets, scale, impl), scale


def silu_mul_quantize_unchecked(c1: jax.Array, group_offsets: jax.Array, scale: jax.Array, impl: str) -> jax.Array:
    """silu_mul_quantize's q for checked arguments and a resolved implementation."""
    if c1.size == 0:  # nothing to write: no kernel launch (static shapes, jit-safe)
        return jnp.zeros((c1.shape[0], c1.shape[1] // 2), FP8_DTYPE)
    if impl == "cuda":
        return _silu_mul_quantize_cuda(c1, group_offsets, scale)
    return silu_mul_quantize_reference(c1, group_offsets, scale)
