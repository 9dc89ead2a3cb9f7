"""The whole W4AFP8 MoE layer: route -> gather+quant -> GEMM1 -> SiLU*up+quant -> GEMM2 -> combine."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from . import _backend
from ._validate import (check_activation_scaling, check_static_scale, not_differentiable, require_floating,
                        require_integer, require_rank)
from .ops.combine import check_routed_scaling_factor, combine_unchecked
from .ops.gather_quantize import gather_quantize_unchecked
from .ops.grouped_gemm import check_kernel_layout, grouped_gemm_unchecked, is_exact, weights_not_differentiable
from .ops.route import route
from .ops.silu_mul_quantize import silu_mul_quantize_unchecked
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


def check_activation_scales(a1_scale, a2_scale, activation_scaling, impl: str):
    """(a1_scale, a2_scale, per_token) of a layer, checked: static scales as f32 scalars (None:
    dynamic); per_token only with both None (per-token scales are dynamic) and not on the CUDA
    path. Raises ValueError naming the argument."""
    per_token = check_activation_scaling(activation_scaling, impl)
    for name, scale in (("a1_scale", a1_scale), ("a2_scale", a2_scale)):
        if per_token and scale is not None:
            raise ValueError(f"{name} must be None with activation_scaling='per_token': per-token scales are dynamic "
                             "(amax / 448 of each row, computed on the device); static scales are per tensor")
    return check_static_scale("a1_scale", a1_scale), check_static_scale("a2_scale", a2_scale), per_token


def moe(x, topk_ids, topk_weights, w13: W4Weights, w2: W4Weights, *, a1_scale=None, a2_scale=None,
        activation_scaling: str = "per_tensor", routed_scaling_factor: float = 1.0, precision=None,
        implementation: str = "auto") -> jax.Array:
    """One W4AFP8 MoE feed-forward block (docs/numerics.md, steps 1-6): bf16 [M, H].

    x: float [M, H]; topk_ids: integer [M, k] (ids outside [0, E) are dropped slots);
    topk_weights: float [M, k]; w13: W4Weights [E, 2I, H] (gate rows, then up rows);
    w2: W4Weights [E, H, I]. Host (numpy) or device arrays. M = 0 or k = 0 are valid (an idle
    rank's empty batch gives [0, H]; k = 0 gives zeros) and launch no kernel.
    a1_scale / a2_scale: static per-tensor activation scales of the two GEMM inputs (finite,
    >= 2**-126), or None for dynamic scales computed on the device (amax / 448 over the finite
    values; see `w4afp8_jax.quantize_fp8` for the non-finite rules: an inf in x saturates, a NaN
    stays in its own token). activation_scaling: "per_tensor" (one scale per GEMM input) or
    "per_token" (dynamic, with both scales None: one scale per row, amax / 448 over the row's
    finite values: GEMM1's rows are the tokens of x, one scale per token shared by its k slots;
    GEMM2's are the routed (token, slot) rows of silu(gate) * up; docs/numerics.md, "Per-token
    activation scales"). routed_scaling_factor: static finite number.
    precision: None / DEFAULT lets the GEMMs use Hopper's fp8 tensor-core accumulation where it
    is faster; HIGHEST keeps the exact f32 sum of every K group (see `grouped_gemm`).

    Differentiation: exact with respect to topk_weights (the output is linear in them);
    jax.grad with respect to x, a1_scale, a2_scale or the weight scales raises TypeError
    (quantized activations have no useful derivative; no surrogate gradient is defined).

    Raises TypeError / ValueError naming the argument, before any kernel runs, for a wrong rank,
    dtype or size, mismatched shapes between x, topk_ids, topk_weights, w13 and w2, a scale out
    of range (finite and >= 2**-126), an activation_scaling other than the two, a static scale
    with "per_token", or a traced routed_scaling_factor; on the CUDA path also for weights with
    a group size other than 128 or a row count (2I, H) not a multiple of 16, and for
    activation_scaling="per_token" (the kernels take one scale per tensor so far; the reference
    path computes it).
    """
    impl = _backend.resolve(implementation)
    check_moe_args(x, topk_ids, topk_weights, w13, w2, impl)
    a1_scale, a2_scale, per_token = check_activation_scales(a1_scale, a2_scale, activation_scaling, impl)
    rsf = check_routed_scaling_factor(routed_scaling_factor)
    exact = is_exact(precision)
    x = not_differentiable("moe", "x", jnp.asarray(x))
    if a1_scale is not None:
        a1_scale = not_differentiable("moe", "a1_scale", a1_scale)
    if a2_scale is not None:
        a2_scale = not_differentiable("moe", "a2_scale", a2_scale)
    w13 = weights_not_differentiable("moe", "w13", w13)
    w2 = weights_not_differentiable("moe", "w2", w2)

    # Every step below takes checked arguments; route's offsets are ordered and within [0, R].
    routing = route(topk_ids, w13.num_experts, implementation=impl)
    q1, scale1 = gather_quantize_unchecked(x, routing.positions, a1_scale, impl, per_token=per_token)
    c1 = grouped_gemm_unchecked(q1, scale1, w13, routing.group_offsets, exact=exact, impl=impl)
    q2, scale2 = silu_mul_quantize_unchecked(c1, routing.group_offsets, a2_scale, impl, per_token=per_token)
    c2 = grouped_gemm_unchecked(q2, scale2, w2, routing.group_offsets, exact=exact, impl=impl)
    return combine_unchecked(c2, routing.positions, jnp.asarray(topk_weights), rsf, impl)
