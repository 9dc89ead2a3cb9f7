"""Argument checks shared by the public ops.

Every check runs on shapes and dtypes only (static under jit), before any computation, and
raises an error that names the offending argument.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from . import _backend

FP8_DTYPE = jnp.float8_e4m3fn
FP8_MAX = 448.0
MAX_EXPERTS = _backend.limits().max_experts


def require_rank(name: str, x, rank: int) -> None:
    if np.ndim(x) != rank:
        raise ValueError(f"{name} must have rank {rank}, got shape {tuple(np.shape(x))}")


def require_dtype(name: str, x, *dtypes) -> None:
    dtype = jnp.asarray(x).dtype if not hasattr(x, "dtype") else x.dtype
    if not any(dtype == jnp.dtype(d) for d in dtypes):
        names = ", ".join(jnp.dtype(d).name for d in dtypes)
        raise TypeError(f"{name} must have dtype {names}, got {dtype}")


def require_integer(name: str, x) -> None:
    dtype = x.dtype if hasattr(x, "dtype") else jnp.asarray(x).dtype
    if not jnp.issubdtype(dtype, jnp.integer):
        raise TypeError(f"{name} must be an integer array, got dtype {dtype}")


def require_floating(name: str, x) -> None:
    dtype = x.dtype if hasattr(x, "dtype") else jnp.asarray(x).dtype
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating-point array, got dtype {dtype}")


def require_num_experts(num_experts) -> int:
    if isinstance(num_experts, bool) or not isinstance(num_experts, (int, np.integer)):
        raise TypeError(f"num_experts must be a Python int, got {type(num_experts).__name__}")
    if not 1 <= num_experts <= MAX_EXPERTS:
        raise ValueError(f"num_experts must be in [1, {MAX_EXPERTS}], got {num_experts}")
    return int(num_experts)


def check_static_scale(name: str, scale) -> jax.Array | None:
    """Returns the scale as an f32 scalar array; None stays None (dynamic scaling).

    A concrete scale (Python number or concrete array) must be finite and positive; a traced
    scale cannot be inspected and is the caller's responsibility.
    """
    if scale is None:
        return None
    if isinstance(scale, jax.core.Tracer):
        if np.size(scale) != 1:
            raise ValueError(f"{name} must be a scalar, got shape {tuple(np.shape(scale))}")
        return jnp.reshape(scale, ()).astype(jnp.float32)
    value = np.asarray(scale)
    if value.size != 1:
        raise ValueError(f"{name} must be a scalar, got shape {value.shape}")
    if not np.issubdtype(value.dtype, np.floating) and not np.issubdtype(value.dtype, np.integer):
        raise TypeError(f"{name} must be a real number, got dtype {value.dtype}")
    v = float(value.reshape(()))
    if not math.isfinite(v) or v <= 0.0:
        raise ValueError(f"{name} must be finite and positive, got {v}")
    with np.errstate(over="ignore", under="ignore"):
        v32 = np.float32(v)
    if not np.isfinite(v32) or v32 <= 0.0:  # e.g. 1e-50 or 1e39: zero or inf once in f32
        raise ValueError(f"{name} must be finite and positive in float32, got {v}")
    return jnp.asarray(v32, dtype=jnp.float32)
