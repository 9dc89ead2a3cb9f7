"""Tensor parallelism (the seed's `--tp P`): every device holds I/P of every expert's
intermediate dimension and computes the whole layer's routing on all tokens; the outputs are
summed over the mesh axis.

Device r of P holds, of every expert, the gate rows [rI/P, (r+1)I/P) and the up rows of the same
range of w13 [E, 2I, H], and the columns [rI/P, (r+1)I/P) of w2 [E, H, I] (the matching
K/2 packed bytes and K/128 scale columns). SiLU*up is elementwise in the intermediate dimension,
so device r's GEMM 2 input is exactly the one-device h restricted to its columns, and the
layer output is the sum over devices of each device's GEMM 2 partial sums.

`shard_tensor_parallel` arranges full weights so that sharding axis 1 over the P devices gives
each device its slices: w13 rows in the order (gate_0, up_0, gate_1, up_1, ...), and w2 as the P
column slices stacked along N: [E, P*H, I/P]. `tensor_parallel_slice` gives one device's slices
(for a loader that places per-device arrays with `jax.make_array_from_single_device_arrays`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from . import _backend
from ._parallel import axis_size, empty_output, gather_tokens, layer_settings, partial_layer, shard_layer, sum_shares
from ._validate import require_rank
from .moe import check_moe_args
from .weights import W4Weights


def _concat(arrays, axis: int):
    # Host (numpy) weights stay on the host: a full checkpoint may not fit one device.
    xp = np if all(isinstance(a, np.ndarray) for a in arrays) else jnp
    return xp.concatenate(arrays, axis=axis)


def _with_layout(packed, scales, like: W4Weights) -> W4Weights:
    w = W4Weights(packed, scales, like.group_size)
    return w.prepare() if like.layout == "tiled" else w


def _own_layer(w: W4Weights) -> W4Weights:
    """The weight set a `layer()` view names; other weights as they are. A concrete index
    indexes the stack as it is (a host stack stays on the host); a traced one is clamped as
    the layer ops clamp it (`W4Weights.selected`)."""
    if w.index is None or isinstance(w.index, jax.core.Tracer):
        return w.selected()
    i = int(w.index)
    return W4Weights(w.packed[i], w.scales[i], w.group_size, w.layout)


def _check_split(w13: W4Weights, w2: W4Weights, size: int) -> tuple[W4Weights, W4Weights, int]:
    """(w13, w2, I/size): the weights to slice (a view's own layer) and the slice width."""
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    for name, w in (("w13", w13), ("w2", w2)):
        if not isinstance(w, W4Weights):
            raise TypeError(f"{name} must be a W4Weights, got {type(w).__name__}")
    w13, w2 = _own_layer(w13), _own_layer(w2)
    lead13, lead2 = np.shape(w13.packed)[:-3], np.shape(w2.packed)[:-3]
    if lead13 != lead2:
        raise ValueError(f"w13 and w2 must have the same leading (layer) axes, got packed shapes "
                         f"{tuple(np.shape(w13.packed))} and {tuple(np.shape(w2.packed))}")
    if w13.out_features % 2 or w2.in_features != w13.out_features // 2:
        raise ValueError(f"w13 [E, 2I, H] and w2 [E, H, I] disagree: w13 has {w13.out_features} rows, "
                         f"w2 has I = {w2.in_features} columns")
    inter = w2.in_features
    if inter % size or (inter // size) % w2.group_size:
        raise ValueError(f"w2: I = {inter} does not split into {size} slices of a multiple of "
                         f"group_size = {w2.group_size}")
    return w13, w2, inter // size


def tensor_parallel_slice(w13: W4Weights, w2: W4Weights, rank: int, size: int) -> tuple[W4Weights, W4Weights]:
    """Device `rank`'s slices of full weights for tensor parallelism over `size` devices.

    w13: W4Weights [E, 2I, H] (gate rows, then up rows); w2: W4Weights [E, H, I]. Also: `layer(i)`
    views of stacks (the layer the view names is sliced, and returned as one set; a concrete
    index keeps a host stack on the host), or stacks [L, E, N, K/2] (every layer is sliced: the
    results are stacks too).
    Returns (w13_r [E, 2I/size, H]: gate rows [rI/size, (r+1)I/size), then the up rows of the same
    range; w2_r [E, H, I/size]: columns [rI/size, (r+1)I/size)), in the layouts of the inputs.
    Raises ValueError unless I/size is a multiple of the group size (128), so every slice
    keeps whole scale groups, or when w13 and w2 have different leading (layer) axes.
    """
    w13, w2, part = _check_split(w13, w2, size)
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or not 0 <= rank < size:
        raise ValueError(f"rank must be an int in [0, {size}), got {rank!r}")
    inter = w2.in_features
    lo, hi = rank * part, (rank + 1) * part
    p13, s13 = w13.checkpoint_packed(), w13.scales
    rows13 = lambda a: _concat([a[..., lo:hi, :], a[..., inter + lo:inter + hi, :]], axis=-2)
    gs = w2.group_size
    p2, s2 = w2.checkpoint_packed(), w2.scales
    w2_r = _with_layout(p2[..., lo // 2:hi // 2], s2[..., lo // gs:hi // gs], w2)
    return _with_layout(rows13(p13), rows13(s13), w13), w2_r


def shard_tensor_parallel(w13: W4Weights, w2: W4Weights, size: int) -> tuple[W4Weights, W4Weights]:
    """Full weights arranged for `moe_tensor_parallel` over `size` devices.

    w13: W4Weights [E, 2I, H]; w2: W4Weights [E, H, I]; or `layer(i)` views, or stacks
    [L, E, N, K/2], as in `tensor_parallel_slice` (a stack gives arranged stacks, whose
    `layer(i)` views `moe_tensor_parallel` takes). Returns (w13_tp [E, 2I, H], rows in the
    order gate_0, up_0, gate_1, up_1, ... of `tensor_parallel_slice`; w2_tp [E, size*H, I/size],
    device r's column slice at rows [rH, (r+1)H)). Sharding axis -2 (N) of both (every array of
    the W4Weights) over the mesh axis, `NamedSharding(mesh, PartitionSpec(None, axis_name))`
    (`PartitionSpec(None, None, axis_name)` for stacks), puts each device's slices on it.
    size = 1 returns the weights unchanged (a view: its layer). Host (numpy) arrays stay on the
    host. Raises ValueError unless I/size is a multiple of the group size (128), or when w13 and
    w2 have different leading (layer) axes.
    """
    w13, w2, _ = _check_split(w13, w2, size)
    slices = [tensor_parallel_slice(w13, w2, r, size) for r in range(size)]
    stack = lambda ws, axis: W4Weights(_concat([w.packed for w in ws], axis), _concat([w.scales for w in ws], axis),
                                       ws[0].group_size, ws[0].layout)
    # Tiled blocks are 16 rows x one K group: whole row blocks concatenate along N unchanged.
    return stack([s[0] for s in slices], -2), stack([s[1] for s in slices], -2)


def moe_tensor_parallel(x, topk_ids, topk_weights, w13: W4Weights, w2: W4Weights, *, mesh: Mesh,
                        axis_name: str = "tp", token_sharded: bool = False, a1_scale=None, a2_scale=None,
                        activation_scaling: str = "per_tensor", routed_scaling_factor: float = 1.0, precision=None,
                        implementation: str = "auto") -> jax.Array:
    """`moe` with every expert's intermediate dimension split over `axis_name` of `mesh`.

    x: float [M, H]; topk_ids: integer [M, k]; topk_weights: float [M, k]: replicated over the
    axis (token_sharded=False: the output bf16 [M, H] is replicated, a psum of the devices'
    shares), or sharded along tokens (token_sharded=True, M divisible by the axis size P: the
    tokens are all-gathered first and the output is reduce-scattered back, sharded like x).
    w13, w2: the arrangement of `shard_tensor_parallel(w13, w2, P)`, [E, 2I, H] and
    [E, P*H, I/P], or `layer(i)` views (concrete or traced index) of arranged stacks; fastest
    sharded along axis -2 (N) over the axis (each device's kernels read its block of a stack in
    place). Placement of every array argument (docs/multi_gpu.md): host (numpy), uncommitted or
    on any devices. Arrays not on exactly the mesh's devices (host arrays, arrays committed to
    one device as `load_moe_experts` returns them without sharding=) are copied onto the mesh,
    each device getting its block, on every call (place them once with jax.device_put to avoid
    that); arrays on the mesh's devices in another sharding are resharded inside the program.
    Under jax.jit, the jitted function's own arguments are placed by that jit: one committed to
    devices other than the mesh's makes JAX raise ValueError "Received incompatible devices for
    jitted computation" naming it, before anything runs (device_put it onto the mesh first, or
    close over it).
    Other arguments as in `moe`; dynamic scales are the one-device layer's (amax over all tokens,
    and over every device's slice of h). With activation_scaling="per_token" a token's scale
    needs nothing from the other devices (every device holds all of x), but a (token, slot)
    row of h is split by columns over the devices: its scale is the max over the devices of the
    row's amax (one pmax of R values per layer).

    Numerics: each device computes the one-device layer's fp8 h restricted to its columns
    exactly (c1 columns do not depend on the other columns; the a2 scales are global), so the
    only change is in GEMM 2 and the combine: each device's GEMM 2 rounds its partial sum over
    I/P to bf16 (relative error <= 2^-8 each, bf16's unit roundoff), the combine and the sum
    over devices run in f32, and the total is rounded to bf16 once. Against `moe`, which rounds
    the whole GEMM 2 sum to bf16 once and its combine once, the difference per output element
    is at most 2^-8 * rsf * sum_j |w_j| * (sum_r |c2_r| + |c2|) plus two bf16 roundings of the
    output (2^-8 relative each), up to f32 summation order.

    Raises ValueError for a mesh without `axis_name`, weights not arranged for its size, a
    stack [L, E, N, K/2] passed without `.layer(i)`, an uneven token split (token_sharded) or
    bad scales; TypeError for wrong types.
    """
    size = axis_size(mesh, axis_name)
    for name, w in (("w13", w13), ("w2", w2)):
        if not isinstance(w, W4Weights):
            raise TypeError(f"{name} must be a W4Weights, got {type(w).__name__}")
        w.require_one_set(name)
    require_rank("x", x, 2)
    hidden = np.shape(x)[1]
    if (w2.out_features != size * hidden or w13.out_features != 2 * size * w2.in_features):
        raise ValueError(f"w2 must be arranged by shard_tensor_parallel(w13, w2, {size}) for the {size} devices of "
                         f"{axis_name!r}: expected w2 [E, {size}*H, I/{size}] = [E, {size * hidden}, "
                         f"{w13.out_features // (2 * size)}] with H = {hidden}, got [E, {w2.out_features}, "
                         f"{w2.in_features}]")
    # What one device holds: w13 [(L,) E, 2I/P, H] and w2 [(L,) E, H, I/P] (a layer() view stays one).
    local = lambda w, n: W4Weights(*(jax.ShapeDtypeStruct((*np.shape(a)[:-2], n, np.shape(a)[-1]), a.dtype)
                                     for a in (w.packed, w.scales)), w.group_size, w.layout, w.index)
    impl = _backend.resolve(implementation)
    check_moe_args(x, topk_ids, topk_weights, local(w13, w13.out_features // size), local(w2, hidden), impl)
    layer = layer_settings(x, size=size, axis_name=axis_name, token_sharded=token_sharded, a1_scale=a1_scale,
                           a2_scale=a2_scale, activation_scaling=activation_scaling, precision=precision,
                           routed_scaling_factor=routed_scaling_factor, impl=impl)
    if np.shape(x)[0] == 0:
        return empty_output(x)

    def body(x, ids, tw, w13, w2):
        if token_sharded:
            x, ids, tw = gather_tokens(x, ids, tw, axis_name)
        partial = partial_layer(x, ids, tw, w13, w2, num_experts=w13.num_experts, axis_name=axis_name,
                                columns_split=True, **layer)
        return sum_shares(partial, axis_name, token_sharded=token_sharded)

    return shard_layer(body, x, topk_ids, topk_weights, w13, w2, mesh=mesh, axis_name=axis_name,
                       token_sharded=token_sharded, weight_axis=2)
