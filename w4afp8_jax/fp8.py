"""Per-tensor fp8 (e4m3) activation quantization."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ._validate import FP8_DTYPE, FP8_MAX, check_static_scale, require_floating


def exact_divide(x: jax.Array, divisor) -> jax.Array:
    """x / divisor, correctly rounded. XLA rewrites a division by a broadcast scalar or by a
    constant into a multiply by the reciprocal (which rounds differently); an optimization
    barrier on the broadcast divisor keeps the true division."""
    return x / jax.lax.optimization_barrier(jnp.broadcast_to(jnp.asarray(divisor, x.dtype), jnp.shape(x)))


def saturate_to_fp8(x_f32: jax.Array, scale: jax.Array) -> jax.Array:
    """q = saturate(x / scale) to [-448, 448], rounded to nearest even e4m3.

    The division (not a multiply by the reciprocal) is the definition the kernels reproduce.
    """
    return jnp.clip(exact_divide(x_f32, scale), -FP8_MAX, FP8_MAX).astype(FP8_DTYPE)


def scale_from_amax(amax: jax.Array) -> jax.Array:
    """amax / 448 as an f32 scalar; amax = 0 (an all-zero tensor) gets scale 1."""
    amax = jnp.asarray(amax, jnp.float32)
    return jnp.where(amax > 0, exact_divide(amax, FP8_MAX), 1.0).astype(jnp.float32)


def dynamic_scale(x_f32: jax.Array) -> jax.Array:
    """amax(|x|) / 448 as an f32 scalar; an all-zero tensor gets scale 1."""
    return scale_from_amax(jnp.max(jnp.abs(x_f32)))


def quantize_fp8(x, scale=None) -> tuple[jax.Array, jax.Array]:
    """Quantizes x to fp8 e4m3 with one per-tensor scale: returns (q, scale).

    scale=None computes the scale from the data (amax / 448). Values beyond the range saturate
    to +-448; overflow never produces NaN.
    """
    require_floating("x", x)
    x = jnp.asarray(x).astype(jnp.float32)
    scale = check_static_scale("scale", scale)
    if scale is None:
        scale = dynamic_scale(x)
    return saturate_to_fp8(x, scale), scale
