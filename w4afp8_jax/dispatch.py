"""Steps 2 and 6: gather token rows into expert order as fp8, and the weighted combine back."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from . import _backend
from ._validate import FP8_DTYPE, check_static_scale, require_dtype, require_floating, require_integer, require_rank
from .fp8 import dynamic_scale, saturate_to_fp8


def _check_positions(positions, num_tokens: int) -> None:
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
    return jax.ffi.ffi_call("w4afp8_gather_quantize", out_type, vmap_method="sequential")(
        x.astype(jnp.bfloat16), positions.astype(jnp.int32), jnp.reshape(scale, (1,)))


def gather_quantize(x, positions, scale=None, *, implementation: str = "auto") -> tuple[jax.Array, jax.Array]:
    """Writes fp8 rows of x in expert order: row positions[t, j] of the result is
    saturate(x[t] / scale). Returns (rows [M*k, H] fp8, scale).

    x: bf16 [M, H] (other float dtypes are cast to bf16 on the CUDA path); positions from
    `route`. scale=None computes amax(|x|) / 448 on the device. Rows that no slot maps to
    (those at or past group_offsets[E]) are unspecified on the CUDA path and zero on the
    reference path; no later step reads them.
    """
    require_rank("x", x, 2)
    require_floating("x", x)
    _check_positions(positions, np.shape(x)[0])
    x, positions = jnp.asarray(x), jnp.asarray(positions)
    scale = check_static_scale("scale", scale)
    if scale is None:
        scale = dynamic_scale(x.astype(jnp.float32))
    if _backend.resolve(implementation) == "cuda":
        return _gather_quantize_cuda(x, positions, scale), scale
    return gather_quantize_reference(x, positions, scale), scale


def combine_reference(rows: jax.Array, positions: jax.Array, topk_weights: jax.Array,
                      routed_scaling_factor: float) -> jax.Array:
    kept = (positions >= 0) & (positions < rows.shape[0])
    gathered = rows[jnp.where(kept, positions, 0)].astype(jnp.float32)  # [M, k, H]
    weights = jnp.where(kept, topk_weights.astype(jnp.float32), 0.0)
    acc = jnp.sum(gathered * weights[..., None], axis=1)
    return (acc * jnp.float32(routed_scaling_factor)).astype(jnp.bfloat16)


def _combine_cuda(rows, positions, topk_weights, routed_scaling_factor: float) -> jax.Array:
    m, _ = positions.shape
    out_type = jax.ShapeDtypeStruct((m, rows.shape[1]), jnp.bfloat16)
    return jax.ffi.ffi_call("w4afp8_combine", out_type, vmap_method="sequential")(
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
    _check_positions(positions, np.shape(topk_weights)[0])
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
