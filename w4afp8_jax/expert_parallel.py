"""Expert parallelism: experts sharded over one mesh axis, each device running the grouped
GEMMs of its own experts with the same ops as `moe`. Two ways to bring the rows to the experts:

dispatch="all_gather" (the default; "replicate the tokens, reduce the outputs"): every device
gets every token (an all_gather when the tokens are sharded, nothing when they are replicated),
computes its experts' contributions to all tokens (slots of other devices' experts are dropped
by its `route`), and an f32 reduce-scatter (or psum) adds the P shares. Per device and layer it
moves M*H activations in and M*H f32 shares out, whatever k is.

dispatch="all_to_all": per shard (P shards, E/P experts each, m = M/P tokens)
  1. route each (token, slot) to the shard owning its expert (`route` with P "experts");
  2. quantize the tokens once with a scale every shard agrees on (static, or the pmax of the
     local amax; per token: each token's own), scatter them into a static send buffer
     [P, m*k, H] (room for every slot going to one shard, so nothing is ever dropped for
     capacity) and all_to_all it with the local expert ids (and, per token, the rows' scales);
  3. on the received rows: `route` over the local experts, grouped GEMM 1, SiLU*up requantized
     (dynamic scale: pmax of the local amax; per token: each row's own), grouped GEMM 2, rows
     back in arrival order;
  4. all_to_all the results back and `combine` them with the routing weights.
It sends one row per slot (k rows per token) in a buffer P times larger than the rows sent:
more bytes than the all_gather dispatch whenever k >= P (DeepSeek-V3: k = 8).

Buffers are sized from shapes only; nothing is read on the host.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from . import _backend
from ._parallel import (axis_size, empty_output, gather_tokens, global_scale, layer_settings, max_over, partial_layer,
                        shard_layer, sum_shares)
from .fp8 import dynamic_scale, saturate_to_fp8
from .moe import check_moe_args
from .ops.combine import combine
from .ops.gather_quantize import scatter_rows
from .ops.grouped_gemm import grouped_gemm
from .ops.route import DROPPED, route
from .ops.silu_mul_quantize import silu_mul_quantize_unchecked
from .weights import W4Weights

DISPATCHES = ("all_gather", "all_to_all")


def _all_to_all_layer(x, topk_ids, topk_weights, w13, w2, *, axis_name, num_shards, num_experts, a1_scale,
                      a2_scale, per_token, routed_scaling_factor, precision, impl):
    m, k = topk_ids.shape
    local_experts = num_experts // num_shards
    capacity = m * k

    # 1. Which shard serves each slot, and its place in that shard's part of the send buffer.
    valid = (topk_ids >= 0) & (topk_ids < num_experts)
    dest = jnp.where(valid, topk_ids // local_experts, num_shards).astype(jnp.int32)
    to_shards = route(dest, num_shards, implementation=impl)
    slot_in_dest = to_shards.positions - to_shards.group_offsets[jnp.minimum(dest, num_shards - 1)]
    send_index = jnp.where(valid, dest * capacity + slot_in_dest, DROPPED)  # [m, k]

    # 2. fp8 rows and local expert ids (per token: the rows' scales too) out to their shards.
    x32 = x.astype(jnp.float32)
    if a1_scale is not None:
        scale1 = a1_scale
    else:  # a token's amax is its own; a tensor's is the max over the shards' tokens
        scale1 = dynamic_scale(x32, per_row=True) if per_token else global_scale(x32, axis_name)
    target = jnp.where(send_index >= 0, send_index, num_shards * capacity).reshape(-1)
    send = lambda per_slot, fill: scatter_rows(per_slot, target, num_shards * capacity, fill)  # noqa: E731
    per_slot = lambda per_token_values: jnp.repeat(per_token_values, k, axis=0)  # noqa: E731
    local_ids = jnp.where(valid, topk_ids - dest * local_experts, local_experts).astype(jnp.int32)
    exchange = lambda a: jax.lax.all_to_all(a.reshape(num_shards, capacity, *a.shape[1:]), axis_name, 0, 0,
                                            tiled=True).reshape(a.shape)
    recv_rows = exchange(send(per_slot(saturate_to_fp8(x32, scale1)), 0))
    recv_ids = exchange(send(local_ids.reshape(-1), local_experts))

    # 3. The local experts' FFN on the received rows (empty rows carry id = local_experts: dropped).
    local = route(recv_ids[:, None], local_experts, implementation=impl)
    order = local.positions[:, 0]
    rows = jnp.where(order >= 0, order, recv_ids.shape[0])
    in_expert_order = lambda received, fill: scatter_rows(received, rows, recv_ids.shape[0], fill)  # noqa: E731
    if per_token:  # rows no slot filled keep scale 1, as in gather_quantize
        scale1 = in_expert_order(exchange(send(per_slot(scale1), 1.0)), 1.0)
    c1 = grouped_gemm(in_expert_order(recv_rows, 0), scale1, w13, local.group_offsets, precision=precision,
                      implementation=impl)
    # A received row's h is all on this shard: per token its own amax is the global one.
    q2, scale2 = silu_mul_quantize_unchecked(c1, local.group_offsets, a2_scale, impl, per_token=per_token,
                                             global_amax=None if per_token else max_over(axis_name))
    c2 = grouped_gemm(q2, scale2, w2, local.group_offsets, precision=precision, implementation=impl)
    back = jnp.where((order >= 0)[:, None], c2[jnp.maximum(order, 0)], jnp.zeros((), c2.dtype))

    # 4. Results home, weighted sum per token.
    return combine(exchange(back), send_index, topk_weights, routed_scaling_factor, implementation=impl)


def _all_gather_layer(x, topk_ids, topk_weights, w13, w2, *, axis_name, num_experts, token_sharded, **layer):
    if token_sharded:
        x, topk_ids, topk_weights = gather_tokens(x, topk_ids, topk_weights, axis_name)
    local_experts = num_experts // jax.lax.axis_size(axis_name)
    first = jax.lax.axis_index(axis_name) * local_experts
    mine = (topk_ids >= first) & (topk_ids < first + local_experts)
    local_ids = jnp.where(mine, topk_ids - first, local_experts).astype(jnp.int32)
    partial = partial_layer(x, local_ids, topk_weights, w13, w2, num_experts=local_experts, axis_name=axis_name,
                            columns_split=False, **layer)
    return sum_shares(partial, axis_name, token_sharded=token_sharded)


def moe_expert_parallel(x, topk_ids, topk_weights, w13: W4Weights, w2: W4Weights, *, mesh: Mesh,
                        axis_name: str = "ep", dispatch: str = "all_gather", token_sharded: bool = True,
                        a1_scale=None, a2_scale=None, activation_scaling: str = "per_tensor",
                        routed_scaling_factor: float = 1.0, precision=None, implementation: str = "auto") -> jax.Array:
    """`moe` with the experts (w13, w2: expert axis) sharded over `axis_name` of `mesh`.

    x: float [M, H]; topk_ids: integer [M, k]; topk_weights: float [M, k]: sharded along tokens
    over the axis (token_sharded=True; M divisible by the axis size P; the output bf16 [M, H] is
    sharded like x) or replicated (token_sharded=False, only with dispatch="all_gather": the
    output is replicated). w13, w2: W4Weights [E, 2I, H] and [E, H, I], or `layer(i)` views
    (concrete or traced index) of stacks [L, E, N, K/2]; fastest sharded along the expert axis
    (axis -3) over the axis (each device's kernels read its block of a stack in place). E must
    be divisible by P; device r holds experts [rE/P, (r+1)E/P).
    Placement of every array argument: as in `moe_tensor_parallel` (host, uncommitted or on any
    devices; arrays off the mesh are copied onto it on every call; under jax.jit, a jitted
    function's argument committed to devices other than the mesh's makes JAX raise ValueError
    "Received incompatible devices": device_put it onto the mesh first, or close over it).
    dispatch: "all_gather" or "all_to_all" (module docstring: what each moves). Other arguments
    as in `moe`; dynamic per-tensor scales are global maxima over all devices. Per-token scales
    (activation_scaling="per_token") need no cross-device max: a token's row of x and a
    (token, slot) row of h each live whole on one device, so every row's amax is local (with
    all_to_all the token scales travel with their rows).

    Numerics: every (token, slot) row goes through the one-device layer's per-row math on its
    expert's device, so the result equals `moe` up to f32 summation order: all_to_all runs
    `combine` on the returned bf16 rows; all_gather adds the devices' f32 combine sums and
    rounds once.

    Raises ValueError for a mesh without `axis_name`, uneven splits of M (token_sharded) or E,
    a stack [L, E, N, K/2] passed without `.layer(i)`, an unknown dispatch, or bad scales;
    TypeError for wrong types.
    """
    impl = _backend.resolve(implementation)
    check_moe_args(x, topk_ids, topk_weights, w13, w2, impl)
    num_shards = axis_size(mesh, axis_name)
    if dispatch not in DISPATCHES:
        raise ValueError(f"dispatch must be one of {DISPATCHES}, got {dispatch!r}")
    if dispatch == "all_to_all" and not token_sharded:
        raise ValueError('dispatch="all_to_all" needs token_sharded=True (tokens replicated over the axis would be '
                         'sent P times); use dispatch="all_gather"')
    layer = layer_settings(x, size=num_shards, axis_name=axis_name, token_sharded=token_sharded, a1_scale=a1_scale,
                           a2_scale=a2_scale, activation_scaling=activation_scaling, precision=precision,
                           routed_scaling_factor=routed_scaling_factor, impl=impl)
    num_experts = w13.num_experts
    if num_experts % num_shards:
        raise ValueError(f"w13: {num_experts} experts do not split evenly over {num_shards} shards of {axis_name!r}")
    if np.shape(x)[0] == 0:
        return empty_output(x)
    if dispatch == "all_gather":
        body = lambda *a: _all_gather_layer(*a, axis_name=axis_name, num_experts=num_experts,
                                            token_sharded=token_sharded, **layer)
    else:
        body = lambda *a: _all_to_all_layer(*a, axis_name=axis_name, num_shards=num_shards, num_experts=num_experts,
                                            **layer)
    return shard_layer(body, x, topk_ids, topk_weights, w13, w2, mesh=mesh, axis_name=axis_name,
                       token_sharded=token_sharded, weight_axis=3)
