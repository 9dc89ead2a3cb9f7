"""Argument checks shared by the public ops, and the guard that makes differentiation fail
loudly.

Every check runs on shapes, dtypes and concrete (non-traced) values only, before any
computation, and raises an error that names the offending argument.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from . import _backend

FP8_DTYPE = jnp.float8_e4m3fn
FP8_MAX = 448.0
# Smallest normal f32 (2**-126). Scales below it are subnormal, which XLA on the CPU flushes to
# zero (0 / scale would become NaN there): activation scales must be at least this.
MIN_SCALE = float(np.finfo(np.float32).tiny)
MAX_EXPERTS = _backend.limits().max_experts


def require_rank(name: str, x, rank: int) -> None:
    if np.ndim(x) != rank:
        raise ValueError(f"{name} must have rank {rank}, got shape {tuple(np.shape(x))}")


def dtype_of(x) -> np.dtype:
    """The dtype the caller passed: x.dtype, or NumPy's for Python lists and scalars. (jnp.asarray
    would narrow 64-bit values to 32 bits without jax_enable_x64, and a message would then name a
    dtype nobody passed.)"""
    return np.dtype(x.dtype) if hasattr(x, "dtype") else np.asarray(x).dtype


def require_dtype(name: str, x, *dtypes) -> None:
    dtype = dtype_of(x)
    if not any(dtype == jnp.dtype(d) for d in dtypes):
        names = ", ".join(jnp.dtype(d).name for d in dtypes)
        raise TypeError(f"{name} must have dtype {names}, got {dtype}")


def require_integer(name: str, x) -> None:
    dtype = dtype_of(x)
    if not jnp.issubdtype(dtype, jnp.integer):
        raise TypeError(f"{name} must be an integer array, got dtype {dtype}")


def require_floating(name: str, x) -> None:
    dtype = dtype_of(x)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating-point array, got dtype {dtype}")


# Host arrays are checked in blocks of about this many elements along their first axis: a
# memory-mapped checkpoint is then read once, without a full-size boolean temporary.
HOST_BLOCK_ELEMENTS = 1 << 22


def _first_nonfinite_host(x: np.ndarray):
    step = max(1, HOST_BLOCK_ELEMENTS // max(1, math.prod(x.shape[1:])))
    for start in range(0, x.shape[0], step):
        bad = ~np.isfinite(x[start:start + step])
        if bad.any():
            first = np.argwhere(bad)[0]
            return (start + int(first[0]), *map(int, first[1:]))
    return None


@jax.jit
def _first_nonfinite_device(x: jax.Array):
    """(any non-finite, index of the first one): one axis at a time, so that every index fits
    int32 whatever the array's size (a flat index of a large sharded array would not)."""
    bad = ~jnp.isfinite(x)
    found = jnp.any(bad)
    index = []
    for _ in range(x.ndim):
        i = jnp.argmax(jnp.any(bad, axis=tuple(range(1, bad.ndim))))  # the first row holding one
        index.append(i)
        bad = bad[i]
    return found, jnp.stack(index)


def require_finite(name: str, x, what: str) -> None:
    """Raises ValueError "name[i, j, ...] is nan: <what> must be finite" at the first non-finite
    element (row-major order) of a concrete array x [d0, ...] (rank >= 1). Host (NumPy) arrays are
    checked on the host, device arrays on their device (only the index comes back); a tracer
    cannot be inspected and passes."""
    if isinstance(x, jax.core.Tracer):
        return
    if isinstance(x, jax.Array):
        with jax.ensure_compile_time_eval():  # a concrete array closed over under jit is checked too
            found, index = _first_nonfinite_device(x)
            first = tuple(int(i) for i in np.asarray(index)) if bool(found) else None
            value = None if first is None else float(x[first])
    else:
        x = np.asarray(x)
        first = _first_nonfinite_host(x)
        value = None if first is None else float(x[first])
    if first is not None:
        raise ValueError(f"{name}[{', '.join(map(str, first))}] is {value}: {what} must be finite")


def static_hint(value) -> str:
    """What to do when a traced value reaches an argument that must be static."""
    if isinstance(value, jax.core.Tracer):
        return " (a traced value: under jax.jit close over it or list it in static_argnames)"
    return ""


def is_real_dtype(dtype) -> bool:
    """Floating or integer (bf16 and f16 included); not bool, complex or str."""
    return bool(jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer))


def require_static_int(name: str, value) -> int:
    """value as an int; raises TypeError unless it is a Python or NumPy int (not bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be a Python int, got {type(value).__name__}{static_hint(value)}")
    return int(value)


def require_num_experts(num_experts) -> int:
    num_experts = require_static_int("num_experts", num_experts)
    if not 1 <= num_experts <= MAX_EXPERTS:
        raise ValueError(f"num_experts must be in [1, {MAX_EXPERTS}], got {num_experts}")
    return num_experts


def int32_offsets(group_offsets, num_rows: int) -> jax.Array:
    """group_offsets as int32. Other integer dtypes are first clipped into [0, num_rows] (on the
    host for host arrays), so no value wraps around when narrowed; for the ops that take
    offsets, clipping into [0, R] never changes the result."""
    if dtype_of(group_offsets) == np.int32:
        return jnp.asarray(group_offsets)
    if not isinstance(group_offsets, jax.Array):
        return jnp.asarray(np.clip(np.asarray(group_offsets), 0, num_rows).astype(np.int32))
    return jnp.clip(group_offsets, 0, num_rows).astype(jnp.int32)


def check_static_scale(name: str, scale) -> jax.Array | None:
    """Returns the scale as an f32 scalar array; None stays None (dynamic scaling).

    A concrete scale (Python number or concrete array) must be finite and at least MIN_SCALE
    (2**-126, the smallest normal f32) once rounded to f32; a traced scale cannot be inspected
    and is the caller's responsibility.
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
    if not is_real_dtype(value.dtype):
        raise TypeError(f"{name} must be a real number, got dtype {value.dtype}")  # (bf16 and f16 are)
    v = float(value.reshape(()))
    if not math.isfinite(v) or v <= 0.0:
        raise ValueError(f"{name} must be finite and positive, got {v}")
    with np.errstate(over="ignore", under="ignore"):
        v32 = np.float32(v)
    if not np.isfinite(v32):  # e.g. 1e39: inf once in f32
        raise ValueError(f"{name} must be finite in float32 (at most {np.finfo(np.float32).max:.4g}), got {v}")
    if v32 < MIN_SCALE:  # zero or subnormal in f32, e.g. 1e-39 or 1e-50
        raise ValueError(f"{name} must be at least the smallest normal float32 ({MIN_SCALE:.6g} = 2**-126), "
                         f"got {v}: XLA on the CPU flushes subnormal scales to zero")
    return jnp.asarray(v32, dtype=jnp.float32)


PER_TOKEN = "per_token"
ACTIVATION_SCALINGS = ("per_tensor", PER_TOKEN)


def check_scale(name: str, scale) -> tuple[jax.Array | None, bool]:
    """A quantizer's scale argument: (the static scale as an f32 scalar, False) for a number
    (`check_static_scale`), (None, False) for None (dynamic per tensor), (None, True) for
    "per_token" (dynamic per row)."""
    if isinstance(scale, str):
        if scale != PER_TOKEN:
            raise ValueError(f'{name} must be a number, None (dynamic per tensor) or "per_token" (dynamic per row), '
                             f"got {scale!r}")
        return None, True
    return check_static_scale(name, scale), False


def require_reference_path(name: str, what: str, impl: str) -> None:
    """Raise ValueError naming `name` when the CUDA path (impl == "cuda") is asked for `what`,
    which only the reference path computes so far (the kernels take one scale per tensor)."""
    if impl == "cuda":
        raise ValueError(f"{name}: {what} are not supported by the CUDA kernels yet (they take one scale per "
                         "tensor); implementation='reference' computes them")


def check_activation_scaling(activation_scaling, impl: str) -> bool:
    """Whether `activation_scaling` asks for per-token scales; raises ValueError naming it for a
    value outside ACTIVATION_SCALINGS, and for "per_token" on the CUDA path."""
    if not isinstance(activation_scaling, str) or activation_scaling not in ACTIVATION_SCALINGS:
        raise ValueError(f"activation_scaling must be one of {ACTIVATION_SCALINGS}, got {activation_scaling!r}")
    per_token = activation_scaling == PER_TOKEN
    if per_token:
        require_reference_path("activation_scaling", "per-token activation scales ('per_token')", impl)
    return per_token


def check_lhs_scale(name: str, scale, num_rows: int, impl: str) -> jax.Array:
    """A GEMM's lhs scale as f32: a scalar (`check_static_scale`), or one scale per row of lhs
    (shape [num_rows]; a size-1 array is a scalar), each of which must be finite and at least
    MIN_SCALE when concrete (checked on its device; a traced one cannot be inspected). Raises
    ValueError / TypeError naming `name`; for per-row scales on the CUDA path too."""
    if np.size(scale) == 1 or np.ndim(scale) == 0:
        return check_static_scale(name, scale)
    if np.shape(scale) != (num_rows,):
        raise ValueError(f"{name} must be a scalar or hold one scale per row of lhs, shape ({num_rows},); "
                         f"got shape {tuple(np.shape(scale))}")
    require_reference_path(name, "per-row scales (shape [R])", impl)
    if not is_real_dtype(dtype_of(scale)):
        raise TypeError(f"{name} must hold real numbers, got dtype {dtype_of(scale)}")
    if isinstance(scale, jax.core.Tracer):
        return scale.astype(jnp.float32)
    with jax.ensure_compile_time_eval(), np.errstate(over="ignore", under="ignore"):  # concrete: checked now
        values = jnp.asarray(scale, jnp.float32)  # values beyond f32's range become inf or 0, and are refused
        bad = ~(jnp.isfinite(values) & (values >= MIN_SCALE))
        first = int(jnp.argmax(bad)) if bool(jnp.any(bad)) else None
    if first is not None:
        raise ValueError(f"{name}[{first}] is {float(np.asarray(scale)[first])}: row scales must be finite and at "
                         f"least the smallest normal float32 ({MIN_SCALE:.6g} = 2**-126)")
    return values


# ---------------------------------------------------------------------------------------------
# Differentiation
# ---------------------------------------------------------------------------------------------
@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _no_derivative(message: str, x):
    return x


@_no_derivative.defjvp
def _no_derivative_jvp(message, primals, tangents):
    raise TypeError(message)


QUANTIZED = ("the fp8 quantization it applies is piecewise constant, and this library defines no "
             "surrogate (e.g. straight-through) gradient for it")
NO_RULE = "the CUDA kernels have no derivative (transpose) rule, and the reference path follows them"


def not_differentiable(op: str, name: str, x, reason: str = QUANTIZED):
    """x unchanged; differentiating the result with respect to anything x depends on raises a
    TypeError naming `op`, `name` and `reason` when JAX traces the derivative (jax.grad,
    jax.jvp, jax.vjp, jax.linearize), instead of returning a zero or meaningless gradient.

    Only tracers can carry a derivative, so concrete (host or device) arrays pass through
    untouched; under jit without differentiation the guard is an identity that XLA removes.
    """
    if not isinstance(x, jax.core.Tracer):
        return x
    message = (f"{op} is not differentiable with respect to {name}: {reason}. Differentiate with "
               f"respect to other arguments only (wrap {name} in jax.lax.stop_gradient), or define "
               "your own rule with jax.custom_jvp / jax.custom_vjp.")
    return _no_derivative(message, x)
