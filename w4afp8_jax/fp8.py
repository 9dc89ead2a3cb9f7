"""fp8 (e4m3) activation quantization, one scale per tensor or per row: the rules every
quantizer of the package follows, on the reference and the CUDA path (docs/numerics.md, "Rules").

- q = saturate(x / scale) to [-448, 448], rounded to nearest even e4m3; the division is the
  IEEE f32 division (not a multiply by the reciprocal).
- Non-finite input: +-inf saturates to +-448; NaN stays NaN (in its own element only).
- A dynamic scale is amax / 448, with amax the largest |x| over the *finite* elements of the
  tensor (per tensor) or of each row (per token: rows are the last axis), so one inf or NaN
  never changes how the other elements (tokens) are quantized.
- Scales are normal f32 numbers (>= MIN_SCALE = 2**-126): XLA on the CPU flushes subnormal f32
  to zero, so a subnormal divisor would turn 0 / scale into NaN there. Static scales below it
  are rejected (`_validate.check_static_scale`); a dynamic scale is clamped up to it, and a
  tensor (or row) with amax below it (all zeros, empty, or only subnormal/non-finite values)
  gets scale 1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ._validate import FP8_DTYPE, FP8_MAX, MIN_SCALE, check_scale, not_differentiable, require_floating


def exact_divide(x: jax.Array, divisor) -> jax.Array:
    """x / divisor, correctly rounded. XLA rewrites a division by a broadcast scalar or by a
    constant into a multiply by the reciprocal (which rounds differently); an optimization
    barrier on the broadcast divisor keeps the true division."""
    return x / jax.lax.optimization_barrier(jnp.broadcast_to(jnp.asarray(divisor, x.dtype), jnp.shape(x)))


def row_broadcast(scale: jax.Array) -> jax.Array:
    """A scale as it divides or multiplies x [..., C]: a scalar as it is; one scale per row
    (shape x.shape[:-1]) with a trailing axis of 1."""
    return scale if jnp.ndim(scale) == 0 else scale[..., None]


def saturate_to_fp8(x_f32: jax.Array, scale: jax.Array) -> jax.Array:
    """q = saturate(x / scale) to [-448, 448], rounded to nearest even e4m3; +-inf gives +-448
    and NaN stays NaN (clip keeps NaN; e4m3fn has a NaN code). scale: a scalar, or one per row
    of x (shape x.shape[:-1]).

    The division (not a multiply by the reciprocal) is the definition the kernels reproduce.
    """
    return jnp.clip(exact_divide(x_f32, row_broadcast(scale)), -FP8_MAX, FP8_MAX).astype(FP8_DTYPE)


def finite_amax(x_f32: jax.Array, *, per_row: bool = False) -> jax.Array:
    """max |x| over the finite elements of x as an f32 scalar, or per_row one per row (over the
    last axis: shape x.shape[:-1]); 0 where there are none (empty x or rows included)."""
    x_f32 = jnp.asarray(x_f32, jnp.float32)
    return jnp.max(jnp.where(jnp.isfinite(x_f32), jnp.abs(x_f32), 0.0), axis=-1 if per_row else None, initial=0.0)


def scale_from_amax(amax: jax.Array) -> jax.Array:
    """The dynamic scale for a tensor (or row) whose finite amax is `amax`, elementwise in f32:
    max(amax / 448, MIN_SCALE), or 1 when amax < MIN_SCALE (zero, subnormal, or NaN).

    amax / 448 puts the largest finite element exactly on +-448. Below MIN_SCALE the quotient
    would be subnormal, which XLA on the CPU flushes to zero, so it is clamped up to MIN_SCALE
    (a tensor with amax < 448 * MIN_SCALE then uses less than the full fp8 range). An amax
    below MIN_SCALE is itself subnormal or zero, read as zero on the CPU, so such a tensor is
    treated like an all-zero one on both paths: scale 1 (every element quantizes to 0).
    """
    amax = jnp.asarray(amax, jnp.float32)
    scaled = jnp.maximum(exact_divide(amax, FP8_MAX), MIN_SCALE)
    return jnp.where(amax >= MIN_SCALE, scaled, 1.0).astype(jnp.float32)


def dynamic_scale(x_f32: jax.Array, *, per_row: bool = False) -> jax.Array:
    """The dynamic scale of x, per tensor (an f32 scalar) or per_row (f32 x.shape[:-1]):
    `scale_from_amax(finite_amax(x, per_row=per_row))`."""
    return scale_from_amax(finite_amax(x_f32, per_row=per_row))


def quantize_fp8(x, scale=None) -> tuple[jax.Array, jax.Array]:
    """Quantizes x to fp8 e4m3: returns (q, scale).

    x: any float array (any shape, empty included), computed on in f32. scale: a positive
    normal f32 number (>= 2**-126; a Python number, a scalar array, or a traced scalar, which
    cannot be checked); None for the dynamic per-tensor scale amax / 448 over the finite
    elements of x (1 when x has no finite element >= 2**-126); or "per_token" for dynamic
    per-row scales, the same rule over each row (the last axis) of x of rank >= 1: scale is then
    f32 x.shape[:-1]. q = saturate(x / scale) to [-448, 448], rounded to nearest even: values
    beyond the range and +-inf saturate to +-448; NaN stays NaN (in its element; its row's
    scale is taken over the row's finite values).

    Raises ValueError / TypeError for a non-float x, a bad static scale, another string, or
    "per_token" with a scalar x. Not differentiable: `jax.grad` through it raises TypeError
    (quantization is piecewise constant).
    """
    require_floating("x", x)
    scale, per_token = check_scale("scale", scale)
    if per_token and np.ndim(x) == 0:
        raise ValueError('scale="per_token" needs an x of rank >= 1 (one scale per row of its last axis), got a scalar')
    x = not_differentiable("quantize_fp8", "x", jnp.asarray(x)).astype(jnp.float32)
    if scale is None:
        scale = dynamic_scale(x, per_row=per_token)
    else:
        scale = not_differentiable("quantize_fp8", "scale", scale)
    return saturate_to_fp8(x, scale), scale
