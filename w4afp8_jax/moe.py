"""The whole W4AFP8 MoE layer: route -> gather+quant -> GEMM1 -> SiLU*up+quant -> GEMM2 -> combine."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from . import _backend
from ._validate import check_static_scale, require_floating, require_integer, require_rank
from .ops.silu_mul_quantize import silu_mul_quantize
from .ops.combine import combine
from .ops.gather_quantize import gather_quantize
from .ops.grouped_gemm import grouped_gemm
from .ops.route import route
from .weights import W4Weights


def check_moe_args(x, topk_ids, topk_weights, w13, w2) -> None:
    require_rank("x", x, 2)
    require_floating("x", x)
    require_rank("topk_ids", topk_ids, 2)
    require_integer("topk_ids", topk_ids)
    require_rank("topk_weights", topk_weights, 2)
    require_floating("topk_weights", topk_weights)
    for name, w in (("w13", w13), ("w2", w2)):
        if not isinstance(w, W4Weights):
            raise TypeError(f"{name} must be a W4Weights, got {type(w).__name__}")
    m, h = np.shape(x)
    if np.shape(topk_ids)[0] != m:
        raise ValueError(f"topk_ids must have one row per token of x ({m}), got shape {tuple(np.shape(topk_ids))}")
    if np.shape(topk_weights) != np.shape(topk_ids):
        raise ValueError(f"topk_weights shape {tuple(np.shape(topk_weights))} must equal topk_ids shape "
                         f"{tuple(np.shape(topk_ids))}")
    if w13.num_experts != w2.num_experts:
        raise ValueError(f"w13 has {w13.num_experts} experts but w2 has {w2.num_experts}")
    if w13.in_features != h:
        raise ValueError(f"w13 expects H = {w13.in_features} input features but x has H = {h}")
    if w13.out_features % 2:
        raise ValueError(f"w13 must have 2*I rows (gate then up), got {w13.out_features}")
    inter = w13.out_features // 2
    if w2.in_features != inter:
        raise ValueError(f"w2 expects I = {w2.in_features} input features but w13 gives I = {inter}")
    if w2.out_features != h:
        raise ValueError(f"w2 produces H = {w2.out_features} features but x has H = {h}")


def moe(x, topk_ids, topk_weights, w13: W4Weights, w2: W4Weights, *, a1_scale=None, a2_scale=None,
        routed_scaling_factor: float = 1.0, precision=None, implementation: str = "auto") -> jax.Array:
    """One W4AFP8 MoE feed-forward block: bf16 [M, H].

    x: float [M, H]; topk_ids: integer [M, k] (ids outside [0, E) are dropped slots);
    topk_weights: float [M, k]; w13: W4Weights [E, 2I, H] (gate rows, then up rows);
    w2: W4Weights [E, H, I]. a1_scale / a2_scale: static per-tensor activation scales of the
    two GEMM inputs, or None for dynamic per-tensor scales computed on the device.
    precision: None / DEFAULT lets the GEMMs use Hopper's fp8 tensor-core accumulation where it
    is faster; HIGHEST keeps the exact f32 sum of every K group (see `grouped_gemm`).
    """
    check_moe_args(x, topk_ids, topk_weights, w13, w2)
    a1_scale = check_static_scale("a1_scale", a1_scale)
    a2_scale = check_static_scale("a2_scale", a2_scale)
    impl = _backend.resolve(implementation)
    routing = route(topk_ids, w13.num_experts, implementation=impl)
    q1, s1 = gather_quantize(x, routing.positions, a1_scale, implementation=impl)
    c1 = grouped_gemm(q1, s1, w13, routing.group_offsets, precision=precision, implementation=impl)
    q2, s2 = silu_mul_quantize(c1, routing.group_offsets, a2_scale, implementation=impl)
    c2 = grouped_gemm(q2, s2, w2, routing.group_offsets, precision=precision, implementation=impl)
    return combine(c2, routing.positions, jnp.asarray(topk_weights), routed_scaling_factor, implementation=impl)
