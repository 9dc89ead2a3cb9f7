"""Expert parallelism: tokens and experts sharded over one mesh axis, fp8 rows exchanged with
JAX's all_to_all (NCCL on GPUs), the local grouped GEMMs run by the same ops as `moe`.

Per shard (P shards, E/P experts each, m tokens):
  1. route each (token, slot) to the shard owning its expert (`route` with P "experts");
  2. quantize the tokens once with a scale every shard agrees on (static, or the pmax of the
     local amax), scatter them into a static send buffer [P, m*k, H] (room for every slot going
     to one shard, so nothing is ever dropped for capacity) and all_to_all it with the local
     expert ids;
  3. on the received rows: `route` over the local experts, grouped GEMM 1, SiLU*up requantized
     (dynamic scale: pmax of the local amax), grouped GEMM 2, rows back in arrival order;
  4. all_to_all the results back and `combine` them with the routing weights.
Buffers are sized from shapes only; nothing is read on the host.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from . import _backend
from ._validate import FP8_DTYPE, check_static_scale
from .ops.silu_mul_quantize import kept_silu_mul, silu_mul_quantize
from .ops.combine import combine
from .fp8 import saturate_to_fp8, scale_from_amax
from .ops.grouped_gemm import grouped_gemm
from .moe import check_moe_args
from .ops.route import DROPPED, route
from .weights import W4Weights


def _shard_layer(x, topk_ids, topk_weights, w13, w2, *, axis_name, num_shards, num_experts, a1_scale,
                 a2_scale, routed_scaling_factor, impl):
    m, k = topk_ids.shape
    hidden = x.shape[1]
    local_experts = num_experts // num_shards
    capacity = m * k

    # 1. Which shard serves each slot, and its place in that shard's part of the send buffer.
    valid = (topk_ids >= 0) & (topk_ids < num_experts)
    dest = jnp.where(valid, topk_ids // local_experts, num_shards).astype(jnp.int32)
    to_shards = route(dest, num_shards, implementation=impl)
    slot_in_dest = to_shards.positions - to_shards.group_offsets[jnp.minimum(dest, num_shards - 1)]
    send_index = jnp.where(valid, dest * capacity + slot_in_dest, DROPPED)  # [m, k]

    # 2. fp8 rows and local expert ids out to their shards.
    x32 = x.astype(jnp.float32)
    # Dynamic scales: the max over shards of the local amax (a shard may have no rows at all).
    global_scale = lambda v: scale_from_amax(jax.lax.pmax(jnp.max(jnp.abs(v)), axis_name))
    scale1 = a1_scale if a1_scale is not None else global_scale(x32)
    q = jnp.repeat(saturate_to_fp8(x32, scale1), k, axis=0)
    target = jnp.where(send_index >= 0, send_index, num_shards * capacity).reshape(-1)
    send_rows = jnp.zeros((num_shards * capacity, hidden), FP8_DTYPE).at[target].set(q, mode="drop")
    local_ids = jnp.where(valid, topk_ids - dest * local_experts, local_experts).astype(jnp.int32)
    send_ids = jnp.full((num_shards * capacity,), local_experts, jnp.int32).at[target].set(
        local_ids.reshape(-1), mode="drop")
    exchange = lambda a: jax.lax.all_to_all(a.reshape(num_shards, capacity, *a.shape[1:]), axis_name, 0, 0,
                                            tiled=True).reshape(a.shape)
    recv_rows, recv_ids = exchange(send_rows), exchange(send_ids)

    # 3. The local experts' FFN on the received rows (empty rows carry id = local_experts: dropped).
    local = route(recv_ids[:, None], local_experts, implementation=impl)
    order = local.positions[:, 0]
    rows = jnp.where(order >= 0, order, recv_ids.shape[0])
    sorted_rows = jnp.zeros_like(recv_rows).at[rows].set(recv_rows, mode="drop")
    c1 = grouped_gemm(sorted_rows, scale1, w13, local.group_offsets, implementation=impl)
    if a2_scale is None:
        a2_scale = global_scale(kept_silu_mul(c1, local.group_offsets))
    q2, scale2 = silu_mul_quantize(c1, local.group_offsets, a2_scale, implementation=impl)
    c2 = grouped_gemm(q2, scale2, w2, local.group_offsets, implementation=impl)
    back = jnp.where((order >= 0)[:, None], c2[jnp.maximum(order, 0)], jnp.zeros((), c2.dtype))

    # 4. Results home, weighted sum per token.
    return combine(exchange(back), send_index, topk_weights, routed_scaling_factor, implementation=impl)


def moe_expert_parallel(x, topk_ids, topk_weights, w13: W4Weights, w2: W4Weights, *, mesh: Mesh,
                        axis_name: str = "ep", a1_scale=None, a2_scale=None, routed_scaling_factor: float = 1.0,
                        implementation: str = "auto") -> jax.Array:
    """`moe` with tokens (x, topk_ids, topk_weights: leading axis) and experts (w13, w2: expert
    axis) sharded over `axis_name` of `mesh`; returns bf16 [M, H] sharded like x.

    M and E must be divisible by the axis size. Same arguments and numerics as `moe` (dynamic
    scales are global maxima over all shards), up to f32 summation order in the GEMMs.
    """
    check_moe_args(x, topk_ids, topk_weights, w13, w2)
    if axis_name not in mesh.axis_names:
        raise ValueError(f"axis_name {axis_name!r} is not an axis of mesh (axes {mesh.axis_names})")
    num_shards = mesh.shape[axis_name]
    num_tokens, num_experts = np.shape(x)[0], w13.num_experts
    if num_tokens % num_shards:
        raise ValueError(f"x: {num_tokens} tokens do not split evenly over {num_shards} shards of {axis_name!r}")
    if num_experts % num_shards:
        raise ValueError(f"w13: {num_experts} experts do not split evenly over {num_shards} shards of {axis_name!r}")
    a1_scale = check_static_scale("a1_scale", a1_scale)
    a2_scale = check_static_scale("a2_scale", a2_scale)
    rsf = float(routed_scaling_factor)
    impl = _backend.resolve(implementation)

    spec = PartitionSpec(axis_name)
    body = lambda x, ids, tw, w13, w2: _shard_layer(
        x, ids, tw, w13, w2, axis_name=axis_name, num_shards=num_shards, num_experts=num_experts,
        a1_scale=a1_scale, a2_scale=a2_scale, routed_scaling_factor=rsf, impl=impl)
    # check_vma=False: the reference GEMM's scan starts from unsharded zeros.
    return jax.shard_map(body, mesh=mesh, in_specs=(spec, spec, spec, spec, spec), out_specs=spec, check_vma=False)(
        jnp.asarray(x), jnp.asarray(topk_ids), jnp.asarray(topk_weights), w13, w2)
