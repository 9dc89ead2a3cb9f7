"""Pieces shared by the multi-GPU layers (expert_parallel.py, tensor_parallel.py).

Both layers can run as "every device sees every token, computes its share of the layer, and a
sum over the mesh axis adds the shares": expert parallelism with the tokens replicated (a
device's share is its experts' rows) and tensor parallelism (a device's share is its slice of
every expert's intermediate dimension). `partial_layer` is that share, summed in f32 so that
adding the shares rounds to bf16 once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ._validate import PER_TOKEN
from .fp8 import finite_amax, scale_from_amax
from .moe import check_activation_scales
from .ops.combine import check_routed_scaling_factor, combine_f32
from .ops.gather_quantize import gather_quantize
from .ops.grouped_gemm import grouped_gemm, is_exact
from .ops.route import route
from .ops.silu_mul_quantize import silu_mul_quantize_unchecked
from .weights import W4Weights


def axis_size(mesh, axis_name) -> int:
    """The size of `axis_name` in `mesh`, with errors naming the argument."""
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    if axis_name not in mesh.axis_names:
        raise ValueError(f"axis_name {axis_name!r} is not an axis of mesh (axes {mesh.axis_names})")
    return int(mesh.shape[axis_name])


def check_precision(precision) -> None:
    is_exact(precision)  # raises a ValueError naming precision


def global_scale(values: jax.Array, axis_name: str) -> jax.Array:
    """The dynamic per-tensor scale of a tensor spread over the devices of `axis_name`: the max
    over devices of each device's amax (a device may hold no rows at all: amax 0)."""
    return scale_from_amax(max_over(axis_name)(finite_amax(values)))  # finite values only (docs/numerics.md)


def max_over(axis_name: str):
    """amax -> its max over the devices of `axis_name` (a scalar, or per row [R] when every
    device holds a part of the same rows)."""
    return lambda amax: jax.lax.pmax(amax, axis_name)


def partial_layer(x, topk_ids, topk_weights, w13, w2, *, num_experts: int, axis_name: str, columns_split: bool,
                  a1_scale, a2_scale, per_token: bool, routed_scaling_factor: float, precision,
                  impl: str) -> jax.Array:
    """One device's share of the layer for tokens every device holds, f32 [M, H], unrounded.

    topk_ids: this device's expert ids in [0, num_experts) (other ids: slots computed
    elsewhere, dropped here); w13 / w2: this device's weights. x being the same on every device,
    a dynamic a1 scale computed here is the global one, per tensor or per token. A dynamic a2
    scale per tensor is the max over the devices of `axis_name` of the amax of their SiLU*up
    values, which is the one-device layer's amax when every kept (row, column) of h lives on
    exactly one device. Per token, a row's h lives on one device (columns_split False: expert
    parallelism, whose devices hold different rows, so the row's own amax is the one-device
    layer's) or is split by columns over all of them (columns_split: tensor parallelism, the
    same rows on every device: the max over the devices of each row's amax).
    """
    routing = route(topk_ids, num_experts, implementation=impl)
    q1, s1 = gather_quantize(x, routing.positions, PER_TOKEN if per_token else a1_scale, implementation=impl)
    c1 = grouped_gemm(q1, s1, w13, routing.group_offsets, precision=precision, implementation=impl)
    local_rows = per_token and not columns_split
    q2, s2 = silu_mul_quantize_unchecked(c1, routing.group_offsets, a2_scale, impl, per_token=per_token,
                                         global_amax=None if local_rows else max_over(axis_name))
    c2 = grouped_gemm(q2, s2, w2, routing.group_offsets, precision=precision, implementation=impl)
    return combine_f32(c2, routing.positions, topk_weights, routed_scaling_factor)


def gather_tokens(x, topk_ids, topk_weights, axis_name: str):
    """All the tokens on every device (all_gather of the token shards, in shard order)."""
    gather = lambda a: jax.lax.all_gather(a, axis_name, axis=0, tiled=True)
    return gather(x), gather(topk_ids), gather(topk_weights)


def sum_shares(partial: jax.Array, axis_name: str, *, token_sharded: bool) -> jax.Array:
    """bf16 sum over the devices of `axis_name` of f32 shares [M, H]: every device gets all M
    rows (psum), or, token_sharded, its own M/P rows (reduce-scatter). One rounding to bf16."""
    if token_sharded:
        total = jax.lax.psum_scatter(partial, axis_name, scatter_dimension=0, tiled=True)
    else:
        total = jax.lax.psum(partial, axis_name)
    return total.astype(jnp.bfloat16)


def layer_settings(x, *, size: int, axis_name: str, token_sharded: bool, a1_scale, a2_scale, activation_scaling,
                   precision, routed_scaling_factor, impl: str) -> dict:
    """The checked keyword arguments of `partial_layer` that both multi-GPU layers take from
    their callers (raises ValueError for uneven token splits, bad scales or scaling)."""
    num_tokens = np.shape(x)[0]
    if token_sharded and num_tokens % size:
        raise ValueError(f"x: {num_tokens} tokens do not split evenly over the {size} devices of {axis_name!r} "
                         f"(token_sharded=True, expert parallelism's default, splits the batch: pad it to a "
                         f"multiple of {size}, or pass token_sharded=False to replicate it)")
    check_precision(precision)
    a1_scale, a2_scale, per_token = check_activation_scales(a1_scale, a2_scale, activation_scaling, impl)
    return dict(a1_scale=a1_scale, a2_scale=a2_scale, per_token=per_token,
                routed_scaling_factor=check_routed_scaling_factor(routed_scaling_factor), precision=precision,
                impl=impl)


def empty_output(x) -> jax.Array:
    """The layer's output for an empty batch (x [0, H]): bf16 [0, H]."""
    return jnp.zeros((0, np.shape(x)[1]), jnp.bfloat16)


def _weight_specs(w: W4Weights, axis_name: str, axis_from_end: int) -> W4Weights:
    """PartitionSpecs for the arrays of `w` ([..., E, N, K/2] and a `layer()` view's index):
    axis -axis_from_end sharded over `axis_name`, leading (layer) axes and the index replicated."""
    def spec(a):
        leading = np.ndim(a) - axis_from_end
        return PartitionSpec(*[None] * leading, axis_name) if leading >= 0 else PartitionSpec()
    return jax.tree.map(spec, w)


def _on_mesh(tree, specs, mesh: Mesh):
    """`tree` with every concrete array that is not on exactly the devices of `mesh` put there
    with NamedSharding(mesh, spec): a jit (the shard_map) refuses arrays committed to other
    devices (e.g. `load_moe_experts` without sharding=: jax.devices()[0]), and host arrays go
    block by block instead of whole to every device. Arrays already on the mesh's devices are
    resharded by the shard_map itself; tracers keep the placement of the enclosing jit, which
    chose it from its own arguments."""
    devices = set(mesh.devices.flat)

    def put(a, spec):
        if isinstance(a, jax.core.Tracer) or (isinstance(a, jax.Array) and a.sharding.device_set == devices):
            return a
        if isinstance(a, np.ndarray) and any(d.process_index != jax.process_index() for d in devices):
            # Several processes: a copy spanning other processes' devices could not be closed
            # over by an enclosing jit; the shard_map places host arrays (the same on every
            # process) itself.
            return a
        # Now, also while tracing (arrays closed over by jit or lax.scan): a staged copy would
        # leave the traced program an argument committed off the mesh.
        with jax.ensure_compile_time_eval():
            return jax.device_put(a, NamedSharding(mesh, spec))
    return jax.tree.map(put, tree, specs)


def shard_layer(body, x, topk_ids, topk_weights, w13: W4Weights, w2: W4Weights, *, mesh: Mesh, axis_name: str,
                token_sharded: bool, weight_axis: int) -> jax.Array:
    """body(x, topk_ids, topk_weights, w13, w2) per device of `axis_name`: tokens sharded along
    axis 0 (token_sharded) or replicated, the weights' axis -weight_axis sharded (3: experts,
    2: rows). Weights may be `layer()` views (each device gets its block of every layer and the
    index, so the kernels still read the layer in place)."""
    tokens = PartitionSpec(axis_name) if token_sharded else PartitionSpec()
    specs = (tokens, tokens, tokens, _weight_specs(w13, axis_name, weight_axis),
             _weight_specs(w2, axis_name, weight_axis))
    as_array = lambda a: a if isinstance(a, (jax.Array, np.ndarray)) else np.asarray(a)  # e.g. nested lists
    args = _on_mesh((as_array(x), as_array(topk_ids), as_array(topk_weights), w13, w2), specs, mesh)
    # check_vma=False: the reference GEMM's scan starts from unsharded zeros. jit: called eagerly,
    # shard_map would run the body op by op (measured on 2 CPU devices: 12-18 s a call, against
    # 1 s to compile it).
    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=tokens, check_vma=False))(*args)
