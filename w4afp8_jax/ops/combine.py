"""Step 6: the weighted combine of each token's expert rows back into token order."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from .. import _backend
from .._validate import is_real_dtype, require_dtype, require_floating, require_rank, static_hint
from .gather_quantize import check_positions


def weighted_sum(rows: jax.Array, positions: jax.Array, topk_weights: jax.Array) -> jax.Array:
    """f32 [M, H]: sum over the kept slots (0 <= positions < R) of weight * row. A dropped
    slot contributes exactly nothing (not 0 * row, which would carry a NaN or inf of the row
    it does not read into the token)."""
    num_rows = rows.shape[0]
    if num_rows == 0:  # every slot is dropped; an empty array cannot be indexed
        return jnp.zeros((positions.shape[0], rows.shape[1]), jnp.float32)
    kept = (positions >= 0) & (positions < num_rows)
    gathered = rows[jnp.where(kept, positions, 0)].astype(jnp.float32)  # [M, k, H]
    terms = gathered * topk_weights.astype(jnp.float32)[..., None]
    return jnp.sum(jnp.where(kept[..., None], terms, 0.0), axis=1)


def combine_f32(rows: jax.Array, positions: jax.Array, topk_weights: jax.Array,
                routed_scaling_factor: float) -> jax.Array:
    """The combine before its bf16 rounding: f32 [M, H] (the reference formula, plain JAX)."""
    return weighted_sum(rows, positions, topk_weights) * jnp.float32(routed_scaling_factor)


def combine_reference(rows: jax.Array, positions: jax.Array, topk_weights: jax.Array,
                      routed_scaling_factor: float) -> jax.Array:
    return combine_f32(rows, positions, topk_weights, routed_scaling_factor).astype(jnp.bfloat16)


@functools.partial(jax.custom_jvp, nondiff_argnums=(3,))
def _combine_cuda(rows, positions, topk_weights, routed_scaling_factor: float) -> jax.Array:
    m, _ = positions.shape
    out_type = jax.ShapeDtypeStruct((m, rows.shape[1]), jnp.bfloat16)
    return _backend.ffi_call("combine", out_type)(
        rows, positions.astype(jnp.int32), topk_weights.astype(jnp.float32),
        routed_scaling_factor=np.float32(routed_scaling_factor))


@_combine_cuda.defjvp
def _combine_cuda_jvp(routed_scaling_factor, primals, tangents):
    # combine is bilinear in (rows, topk_weights): the tangent is the same weighted sum of the
    # tangents, computed by the reference formula (plain JAX, so jax.grad can transpose it).
    rows, positions, topk_weights = primals
    rows_dot, _, weights_dot = tangents
    out = _combine_cuda(rows, positions, topk_weights, routed_scaling_factor)
    out_dot = (combine_f32(rows_dot, positions, topk_weights, routed_scaling_factor)
               + combine_f32(rows, positions, weights_dot, routed_scaling_factor))
    return out, out_dot.astype(out.dtype)


def check_routed_scaling_factor(routed_scaling_factor) -> float:
    """The factor as a Python float; raises unless it is a static finite real number."""
    if not isinstance(routed_scaling_factor, jax.core.Tracer):  # a tracer fails below, with a hint
        if not is_real_dtype(np.asarray(routed_scaling_factor).dtype):  # bool and str convert to float silently
            raise TypeError(f"routed_scaling_factor must be a static real number, got {routed_scaling_factor!r}")
    try:
        rsf = float(routed_scaling_factor)
    except (TypeError, ValueError):
        raise TypeError(f"routed_scaling_factor must be a static real number, got {routed_scaling_factor!r}"
                        f"{static_hint(routed_scaling_factor)}") from None
    if not np.isfinite(rsf):
        raise ValueError(f"routed_scaling_factor must be finite, got {rsf}")
    return rsf


def combine(rows, positions, topk_weights, routed_scaling_factor: float = 1.0, *,
            implementation: str = "auto") -> jax.Array:
    """out[t] = routed_scaling_factor * sum_j topk_weights[t, j] * rows[positions[t, j]],
    accumulated in f32 over kept slots, returned as bf16 [M, H].

    rows: bf16 [R, H] in expert order (GEMM2's output); positions: integer [M, k] from `route`
    (or any row indices: those outside [0, R) count as dropped slots, are never read and add
    nothing, so a NaN in an unread row cannot reach the output); topk_weights: float [M, k].
    M, k, R or H may be 0 (M * H = 0: an empty result; R = 0 or k = 0: every slot is dropped,
    zeros). routed_scaling_factor: a static finite real number.

    Differentiable with respect to rows and topk_weights on both paths (the output is bilinear
    in them; the gradient is that of the f32 sum, the final bf16 rounding passed through as by
    `astype`). Positions are integers: nothing to differentiate.

    Raises TypeError / ValueError naming the argument, before any kernel runs, for a wrong rank,
    dtype or size, mismatched positions / topk_weights shapes, or a routed_scaling_factor that
    is not a static finite number.
    """
    require_rank("rows", rows, 2)
    require_dtype("rows", rows, jnp.bfloat16)
    require_rank("topk_weights", topk_weights, 2)
    require_floating("topk_weights", topk_weights)
    check_positions(positions, np.shape(topk_weights)[0])
    if np.shape(positions) != np.shape(topk_weights):
        raise ValueError(f"topk_weights shape {tuple(np.shape(topk_weights))} must equal positions shape "
                         f"{tuple(np.shape(positions))}")
    rsf = check_routed_scaling_factor(routed_scaling_factor)
    impl = _backend.resolve(implementation)
    rows, positions, topk_weights = jnp.asarray(rows), jnp.asarray(positions), jnp.asarray(topk_weights)
    return combine_unchecked(rows, positions, topk_weights, rsf, impl)


def combine_unchecked(rows: jax.Array, positions: jax.Array, topk_weights: jax.Array, routed_scaling_factor: float,
                      impl: str) -> jax.Array:
    """combine for checked arguments and a resolved implementation."""
    m, k = positions.shape
    if impl == "cuda" and m * k * rows.shape[0] * rows.shape[1] > 0:
        return _combine_cuda(rows, positions, topk_weights, routed_scaling_factor)
    # No kernel launch without work (static shapes, jit-safe): the reference gives the empty
    # or all-dropped (zero) result.
    return combine_reference(rows, positions, topk_weights, routed_scaling_factor)
