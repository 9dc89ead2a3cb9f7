"""Step 4: SiLU(gate) * up on GEMM1's output, requantized to fp8 for GEMM2."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .. import _backend
from .._validate import (FP8_DTYPE, check_scale, int32_offsets, not_differentiable, require_dtype, require_integer,
                         require_rank, require_reference_path)
from ..fp8 import finite_amax, saturate_to_fp8, scale_from_amax


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
    """scale: a scalar, or one per row [R]."""
    kept = kept_rows_mask(group_offsets, c1.shape[0])
    q = saturate_to_fp8(silu_mul(c1), scale)
    return jnp.where(kept[:, None], q, jnp.zeros((), FP8_DTYPE))


def _silu_mul_quantize_cuda(c1, group_offsets, scale) -> jax.Array:
    out_type = jax.ShapeDtypeStruct((c1.shape[0], c1.shape[1] // 2), FP8_DTYPE)
    return _backend.ffi_call("silu_mul_quantize", out_type)(
        c1, group_offsets, jnp.reshape(scale, (1,)))


def silu_mul_quantize(c1, group_offsets, scale=None, *, implementation: str = "auto") -> tuple[jax.Array, jax.Array]:
    """fp8 [R, I] = saturate(silu(c1[:, :I]) * c1[:, I:] / s), f32 math, for the kept rows
    (r < group_offsets[E]); returns (q, scale f32: [] per tensor, [R] per row). Other rows are
    zero on both paths.

    c1: bf16 [R, 2I] (GEMM1's output: gate columns, then up columns; R = 0 gives an empty
    result without a kernel launch). group_offsets: integer [E+1]; only its last entry is read,
    and any value is safe (negative: no row kept; past R: every row kept). scale: static f32
    scale (>= 2**-126); None for amax(|h|) / 448 over the finite h of the kept rows; or
    "per_token" for one dynamic scale per row, amax / 448 over the finite h of that row (the
    same clamping: 1 for a row with no finite |h| >= 2**-126, hence for every row not kept).
    The `w4afp8_jax.quantize_fp8` rules apply: +-inf saturates, NaN stays in its row and no
    scale sees it; h follows IEEE f32, so an infinite c1 can give NaN, e.g. silu(-inf) = -inf /
    inf. Raises ValueError / TypeError naming the argument for a wrong rank, dtype or size, a
    bad scale, or scale="per_token" on the CUDA path (its kernel takes one scale per tensor;
    the reference path computes it). Not differentiable (raises TypeError under jax.grad).
    """
    require_rank("c1", c1, 2)
    require_dtype("c1", c1, jnp.bfloat16)
    if np.shape(c1)[1] % 2:
        raise ValueError(f"c1 must have an even number of columns (gate, then up), got {np.shape(c1)[1]}")
    require_rank("group_offsets", group_offsets, 1)
    require_integer("group_offsets", group_offsets)
    if np.shape(group_offsets)[0] < 1:
        raise ValueError("group_offsets must have E+1 >= 1 entries, got shape (0,)")
    scale, per_token = check_scale("scale", scale)
    impl = _backend.resolve(implementation)
    if per_token:
        require_reference_path("scale", "per-token scales ('per_token')", impl)
    c1 = not_differentiable("silu_mul_quantize", "c1", jnp.asarray(c1))
    group_offsets = int32_offsets(group_offsets, np.shape(c1)[0])
    if scale is not None:
        scale = not_differentiable("silu_mul_quantize", "scale", scale)
    return silu_mul_quantize_unchecked(c1, group_offsets, scale, impl, per_token=per_token)


def silu_mul_quantize_unchecked(c1: jax.Array, group_offsets: jax.Array, scale: jax.Array | None, impl: str, *,
                                per_token: bool = False, global_amax=None) -> tuple[jax.Array, jax.Array]:
    """silu_mul_quantize's (q, scale) for checked arguments and a resolved implementation.
    scale None: dynamic, per tensor or per row (per_token); global_amax, if given, maps the local
    amax (scalar or [R]) to the one the scale is taken from (the multi-device layers: a max over
    the devices that hold parts of the same tensor or rows)."""
    if scale is None:
        amax = finite_amax(kept_silu_mul(c1, group_offsets), per_row=per_token)
        scale = scale_from_amax(amax if global_amax is None else global_amax(amax))
    if c1.size == 0:  # nothing to write: no kernel launch (static shapes, jit-safe)
        q = jnp.zeros((c1.shape[0], c1.shape[1] // 2), FP8_DTYPE)
    elif impl == "cuda":
        q = _silu_mul_quantize_cuda(c1, group_offsets, scale)
    else:
        q = silu_mul_quantize_reference(c1, group_offsets, scale)
    return q, scale
