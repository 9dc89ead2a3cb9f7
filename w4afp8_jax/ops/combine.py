"""Step 6: the weighted combine of each token's expert rows back into token order."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .. import _backend
from .._validate import require_dtype, require_floating, require_rank
from .gather_quantize import check_positions


def combine_f32(rows: jax.Array, positions: jax.Array, topk_weights: jax.Array,
                routed_scaling_factor: float) -> jax.Array:
    """combine's f32 sums before the bf16 rounding (the multi-GPU layers add partial sums)."""
    kept = (positions >= 0) & (positions < rows.shape[0])
    gathered = rows[jnp.where(kept, positions, 0)].astype(jnp.float32)  # [M, k, H]
    weights = jnp.where(kept, topk_weights.astype(jnp.float32), 0.0)
    acc = jnp.sum(gathered * weights[..., None], axis=1)
    return acc * jnp.float32(routed_scaling_factor)


def combine_reference(rows: jax.Array, positions: jax.Array, topk_weights: jax.Array,
                      routed_scaling_factor: float) -> jax.Array:
    return combine_f32(rows, positions, topk_weights, routed_scaling_factor).astype(jnp.bfloat16)


def _combine_cuda(rows, positions, topk_weights, routed_scaling_factor: float) -> jax.Array:
    m, _ = positions.shape
    out_type = jax.ShapeDtypeStruct((m, rows.shape[1]), jnp.bfloat16)
    return _backend.ffi_call("combine", out_type)(
        rows, positions.astype(jnp.int32), topk_weights.astype(jnp.float32),
        routed_scaling_factor=np.float32(routed_scaling_factor))


def combine(rows, positions, topk_weights, routed_scaling_factor: float = 1.0, *,
            implementation: str = "auto") -> jax.Array:
    """out[t] = routed_scaling_factor * sum_j topk_weights[t, j] * rows[positions[t, j]],
    accumulated in f32 over kept slots, returned as bf16 [M, H].

    rows: bf16 [R, H] in expert order (GEMM2's output); positions from `route` (or any row
    indices: those outside [0, R) count as dropped slots and are never read).
    """
    require_rank("rows", rows, 2)
    require_dtype("rows", rows, jnp.bfloat16)
    require_rank("topk_weights", topk_weights, 2)
    require_floating("topk_weights", topk_weights)
    check_positions(positions, np.shape(topk_weights)[0])
    if np.shape(positions) != np.shape(topk_weights):
        raise ValueError(f"topk_weights shape {tuple(np.shape(topk_weights))} must equal positions shape "
                         f"{tuple(np.shape(positions))}")
    try:
        rsf = float(routed_scaling_factor)
    except (TypeError, ValueError):
        raise TypeError(f"routed_scaling_factor must be a static real number, got {routed_scaling_factor!r}") from None
    if not np.isfinite(rsf):
        raise ValueError(f"routed_scaling_factor must be finite, got {rsf}")
    rows, positions, topk_weights = jnp.asarray(rows), jnp.asarray(positions), jnp.asarray(topk_weights)
    if _backend.resolve(implementation) == "cuda":
        return _combine_cuda(rows, positions, topk_weights, rsf)
    return combine_reference(rows, positions, topk_weights, rsf)
