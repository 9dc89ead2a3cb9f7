"""The whole W4AFP8 MoE layer: route -> gather+quant -> GEMM1 -> SiLU*up+quant -> GEMM2 -> combine."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from . import _backend
from ._validate import check_static_scale, not_differentiable, require_floating, require_integer, require_rank
from .fp8 import dynamic_scale
from .ops.combine import check_routed_scaling_factor, combine_unchecked
from .ops.gather_quantize import gather_quantize_unchecked
from .ops.grouped_gemm import check_kernel_layout, grouped_gemm_unchecked, is_exact, weights_not_differentiable
from .ops.route import route
from .ops.silu_mul_quantize import kept_silu_mul, silu_mul_quantize_unchecked
from .weights import W4Weights


def check_moe_args(x, topk_ids, topk_weights, w13, w2, impl: str) -> None:
    """Raise TypeError / ValueError naming the argument for any argument of the layer that its
    implementation `impl` ("reference" or "cuda") cannot take."""
    require_rank("x", x, 2)
    require_floating("x", x)
    require_rank("topk_ids", topk_ids, 2)
    require_integer("topk_ids", topk_ids)
    require_rank("topk_weights", topk_weights, 2)
    require_floating("topk_weights", topk_weights)
    for name, w in (("w13", w13), ("w2", w2)):
        if not isinstance(w, W4Weights):
            raise TypeError(f"{name} must be a W4Weights, got {type(w).__name__}")
        w.require_one_set(name)
    m, h = np.shape(x)
    if np.shape(topk_ids)[0] != m:
        raise ValueError(f"topk_ids must have one row per token of x ({m}), got shape {tuple(np.shape(topk_ids))}")
    if np.shape(topk_weights) != np.shape(topk_ids):
        raise ValueError(f"topk_weights shape {tuple(np.shape(topk_weights))} must equal topk_ids shape "
                         f"{tuple(np.shape(topk_ids))}")
    if w13.num_experts != w2.num_experts:
        raise ValueError(f"w13 has {w13.num_experts} experts but w2 has {w2.num_experts}")
    if w13.in_features != h:
        swapped = w13.out_features == h and w2.in_features == h
        raise ValueError(f"w13 expects H = {w13.in_features} input features but x has H = {h}"
                         + (" (w13 and w2 look swapped: w13 is [E, 2I, H], w2 [E, H, I])" if swapped else ""))
    if w13.out_features % 2:
        raise ValueError(f"w13 must have 2*I rows (gate then up), got {w13.out_features}")
    inter = w13.out_features // 2
    if w2.in_features != inter:
        raise ValueError(f"w2 expects I = {w2.in_features} input features but w13 gives I = {inter}")
    if w2.out_features != h:
        raise ValueError(f"w2 produces H = {w2.out_features} features but x has H = {h}")
    check_kernel_layout("w13", w13, impl)
    check_kernel_layout("w2", w2, impl)


def moe(x, topk_ids, topk_weights, w13: W4Weights, w2: W4Weights, *, a1_scale=None, a2_scale=None,
        routed_scaling_factor: float = 1.0, precision=None, implementation: str = "auto") -> jax.Array:
    """One W4AFP8 MoE feed-forward block (docs/numerics.md, steps 1-6): bf16 [M, H].

    x: float [M, H]; topk_ids: integer [M, k] (ids outside [0, E) are dropped slots);
    topk_weights: float [M, k]; w13: W4Weights [E, 2I, H] (gate rows, then up rows);
    w2: W4Weights [E, H, I]. Host (numpy) or device arrays. M = 0 or k = 0 are valid (an idle
    rank's empty batch gives [0, H]; k = 0 gives zeros) and launch no kernel.
    a1_scale / a2_scale: static per-tensor activation scales of the two GEMM inputs (finite,
    >= 2**-126), or None for dynamic per-tensor scales computed on the device (amax / 448 over
    the finite values; see `w4afp8_jax.quantize_fp8` for the non-finite rules: an inf in x
    saturates, a NaN stays in its own token). routed_scaling_factor: static finite number.
    precision: None / DEFAULT lets the GEMMs use Hopper's fp8 tensor-core accumulation where it
    is faster; HIGHEST keeps the exact f32 sum of every K group (see `grouped_gemm`).

    Differentiation: exact with respect to topk_weights (the output is linear in them);
    jax.grad with respect to x, a1_scale, a2_scale or the weight scales raises TypeError
    (quantized activations have no useful derivative; no surrogate gradient is defined).

    Raises TypeError / ValueError naming the argument, before any kernel runs, for a wrong rank,
    dtype or size, mismatched shapes between x, topk_ids, topk_weights, w13 and w2, a scale out
    of range (finite and >= 2**-126), or a traced routed_scaling_factor; on the CUDA path also
    for weights with a group size other than 128 or a row count (2I, H) not a multiple of 16.
    """
    impl = _backend.resolve(implementation)
    check_moe_args(x, topk_ids, topk_weights, w13, w2, impl)
    a1_scale = check_static_scale("a1_scale", a1_scale)
    a2_scale = check_static_scale("a2_scale", a2_scale)
    rsf = check_routed_scaling_factor(routed_scaling_factor)
    exact = is_exact(precision)
    x = not_differentiable("moe", "x", jnp.asarray(x))
    scale1 = dynamic_scale(x.astype(jnp.float32)) if a1_scale is None else not_differentiable("moe", "a1_scale", a1_scale)
    w13 = weights_not_differentiable("moe", "w13", w13)
    w2 = weights_not_differentiable("moe", "w2", w2)

    # Every step below takes checked arguments; route's offsets are ordered and within [0, R].
    routing = route(topk_ids, w13.num_experts, implementation=impl)
    q1 = gather_quantize_unchecked(x, routing.positions, scale1, impl)
    c1 = grouped_gemm_unchecked(q1, scale1, w13, routing.group_offsets, exact=exact, impl=impl)
    if a2_scale is None:
        scale2 = dynamic_scale(kept_silu_mul(c1, routing.group_offsets))
    else:
        scale2 = not_differentiable("moe", "a2_scale", a2_scale)
    q2 = silu_mul_quantize_unchecked(c1, routing.group_offsets, scale2, impl)
    c2 = grouped_gemm_unchecked(q2, scale2, w2, routing.group_offsets, exact=exact, impl=impl)
    return combine_unchecked(c2, routing.positions, jnp.asarray(topk_weights), rsf, impl)
