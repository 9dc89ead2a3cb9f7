"""The format-independent part of loading routed experts: argument checks, tensor-parallel and
expert-parallel slicing, the tiled layout, sharding, progress. Each checkpoint format describes
its tensors with an `ExpertFormat` (`w4afp8.expert_format`, `compressed_tensors.expert_format`).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Iterable, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec, Sharding, SingleDeviceSharding

from .._validate import ACTIVATION_SCALINGS
from ..weights import TILE_GROUP, W4Weights, tile_packed
from .files import EXPERT_MODULE, EXPERT_WEIGHT, Checkpoint



@dataclasses.dataclass(frozen=True)
class MoEExperts:
    """Routed-expert weights of several MoE layers, stacked along a leading layer axis.

    w13: W4Weights [L, E, 2I, H] (gate rows, then up rows); w2: W4Weights [L, E, H, I].
    a1_scale, a2_scale: f32 [L], the static fp8 scales of the GEMM1 and GEMM2 inputs (per layer,
        the max over all of the layer's experts of the checkpoint's w1/w3 and w2 input scales,
        as SGLang and vLLM take them: the same for every expert subset, tensor-parallel rank and
        sharding, so splitting a layer never changes its numbers), or None when the checkpoint
        has no activation scales (`moe` then computes dynamic per-tensor scales).
    layers: static; the checkpoint's layer ids, in the order of the leading axis.
    activation_scaling: static; the fp8 activation scaling the checkpoint declares: "per_tensor"
        (W4AFP8 checkpoints; compressed-tensors ones with `strategy: tensor`) or "per_token"
        (compressed-tensors W4AFP8: dynamic per-token scales, a1_scale = a2_scale = None): pass
        it to `moe(..., activation_scaling=...)` (the reference path so far; the NNX block
        passes it itself).

    A registered pytree: `jax.lax.scan(f, x, experts)` hands `f` one layer (w13 [E, 2I, H],
    scalar scales) at a time. Raises ValueError for an activation_scaling outside
    ACTIVATION_SCALINGS.
    """

    w13: W4Weights
    w2: W4Weights
    a1_scale: jax.Array | None
    a2_scale: jax.Array | None
    layers: tuple[int, ...] = dataclasses.field(default=(), metadata={"static": True})
    activation_scaling: str = dataclasses.field(default="per_tensor", metadata={"static": True})

    def __post_init__(self):
        if self.activation_scaling not in ACTIVATION_SCALINGS:
            raise ValueError(f"activation_scaling must be one of {ACTIVATION_SCALINGS}, got {self.activation_scaling!r}")


jax.tree_util.register_dataclass(MoEExperts, data_fields=["w13", "w2", "a1_scale", "a2_scale"],
                                 meta_fields=["layers", "activation_scaling"])


@dataclasses.dataclass(frozen=True)
class ExpertFormat:
    """How a checkpoint format stores the routed experts' int4 weights, for `load_experts`.

    A projection [N, K] of expert e in layer L is the module EXPERT_MODULE with the tensors
    `{module}.{packed}`: [N, K / values_per_element] of one of `packed_dtypes`, whose bytes (in
    file order, little-endian) hold two int4 codes each along K, element 2i in the low nibble,
    as W4Weights packs them once XORed with `nibble_xor`; and `{module}.{scale}`: any float
    dtype [N, K / group_size] (widened to f32, exactly), w = int4 * scale.

    name: the format, for messages. packed_hint: appended to a wrong packed dtype's TypeError.
    activation_scaling: as in MoEExperts. check_projection(ckpt, module, (N, K)): the format's
    own header checks of a projection (raises naming the tensor), or None.
    activation_scales(ckpt, layer_ids, num_experts): (a1 [L], a2 [L]) f32 or (None, None);
    None: the format has no activation scales.
    """

    name: str
    packed: str
    scale: str
    packed_dtypes: tuple[type, ...]
    values_per_element: int
    group_size: int
    nibble_xor: int = 0
    packed_hint: str = ""
    activation_scaling: str = "per_tensor"
    check_projection: Callable[[Checkpoint, str, tuple[int, int]], None] | None = None
    activation_scales: Callable[[Checkpoint, list[int], int], tuple] | None = None


def _int_list(name: str, values, low: int, high: int) -> list[int]:
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise TypeError(f"{name} must hold ints, got {v!r}")
        if not low <= v < high:
            raise ValueError(f"{name}: {int(v)} is outside [{low}, {high})")
        out.append(int(v))
    if not out:
        raise ValueError(f"{name} must not be empty")
    return out


def check_projection(ckpt: Checkpoint, fmt: ExpertFormat, module: str, shape: tuple[int, int]) -> None:
    """The packed weights and scales of projection `module` [N, K] (presence, dtype, shape, and
    the format's own checks), from the headers; errors name the tensor."""
    n, k = shape
    for tensor, want in ((fmt.packed, (n, k // fmt.values_per_element)), (fmt.scale, (n, k // fmt.group_size))):
        name = f"{module}.{tensor}"
        if name not in ckpt:
            raise KeyError(f"tensor {name} not found in {ckpt.path}")
        dtype, got = ckpt.dtype(name), ckpt.shape(name)
        if tensor == fmt.packed and dtype not in fmt.packed_dtypes:
            raise TypeError(f"{name}: expected {np.dtype(fmt.packed_dtypes[0]).name} packed int4 "
                            f"({fmt.values_per_element} per element), got {dtype}{fmt.packed_hint}")
        if tensor == fmt.scale and not jax.numpy.issubdtype(dtype, jax.numpy.floating):
            raise TypeError(f"{name}: expected floating-point scales, got {dtype}")
        if got != want:
            raise ValueError(f"{name}: expected shape {list(want)}, got {list(got)}")
    if fmt.check_projection is not None:
        fmt.check_projection(ckpt, module, shape)


def _resolve_sharding(sharding, name: str, shape: tuple[int, ...]) -> Sharding:
    if sharding is None:
        return SingleDeviceSharding(jax.devices()[0])
    if callable(sharding) and not isinstance(sharding, Sharding):
        out = sharding(name, shape)
        if not isinstance(out, Sharding):
            raise TypeError(f"sharding({name!r}, {shape}) must return a jax.sharding.Sharding, got {type(out).__name__}")
        return out
    if not isinstance(sharding, Sharding):
        raise TypeError(f"sharding must be None, a jax.sharding.Sharding or a callable (name, shape) -> Sharding, "
                        f"got {type(sharding).__name__}")
    if len(shape) == 1:  # the per-layer scales
        return replicated(sharding)
    return sharding


def replicated(sharding: Sharding) -> Sharding:
    """A sharding that replicates any array on the devices of `sharding`."""
    if isinstance(sharding, NamedSharding):
        return NamedSharding(sharding.mesh, PartitionSpec())
    if len(sharding.device_set) == 1:
        return sharding
    return NamedSharding(jax.sharding.Mesh(np.array(list(sharding.device_set)), ("devices",)), PartitionSpec())


def _place(name: str, shape: tuple[int, ...], sharding: Sharding, read: Callable, bar) -> jax.Array:
    """A global array from host blocks, each device's block read once (replicas share it)."""
    index_map = sharding.addressable_devices_indices_map(shape)
    blocks: dict[tuple, np.ndarray] = {}
    pieces = []
    for device, index in index_map.items():
        bounds = tuple(s.indices(n)[:2] for s, n in zip(index, shape))
        if bounds not in blocks:
            blocks[bounds] = read(bounds, bar)
        pieces.append(jax.device_put(blocks[bounds], device))
    return jax.make_array_from_single_device_arrays(shape, sharding, pieces)


def load_experts(ckpt: Checkpoint, fmt: ExpertFormat, *, layers: Iterable[int] | None, tp_size: int, tp_rank: int,
                 expert_ids: Sequence[int] | None, sharding, layout: str, progress: bool | None) -> MoEExperts:
    """`load_moe_experts` (arguments and errors documented there) for checkpoint `ckpt` in
    format `fmt`."""
    if layout not in ("tiled", "checkpoint"):
        raise ValueError(f"layout must be 'tiled' or 'checkpoint', got {layout!r}")
    group = fmt.group_size
    if layout == "tiled" and group != TILE_GROUP:
        raise ValueError(f"layout='tiled' needs group_size {TILE_GROUP} (the CUDA kernels' unit), and this {fmt.name} "
                         f"checkpoint has group_size {group}: load it with layout='checkpoint' (the reference path)")
    found = ckpt.expert_layers(fmt.packed)
    if not found:
        raise KeyError(f"no routed-expert tensors ({EXPERT_WEIGHT.format(layer='L', expert='e', proj='gate', tensor=fmt.packed)}) "
                       f"in {ckpt.path}")
    layer_ids = list(found) if layers is None else _int_list("layers", layers, 0, sys.maxsize)
    num_experts = int(ckpt.config().get("n_routed_experts", max(found.values())))
    experts = list(range(num_experts)) if expert_ids is None else _int_list("expert_ids", expert_ids, 0, num_experts)
    for name, value in (("tp_size", tp_size), ("tp_rank", tp_rank)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{name} must be an int, got {value!r}")
    if tp_size < 1 or not 0 <= tp_rank < tp_size:
        raise ValueError(f"need tp_size >= 1 and 0 <= tp_rank < tp_size, got tp_size = {tp_size}, tp_rank = {tp_rank}")

    def module(layer, expert, proj):
        return EXPERT_MODULE.format(layer=layer, expert=expert, proj=proj)

    first = f"{module(layer_ids[0], experts[0], 'gate')}.{fmt.packed}"
    if first not in ckpt:
        raise KeyError(f"tensor {first} not found in {ckpt.path}")
    if len(ckpt.shape(first)) != 2:
        raise ValueError(f"{first}: expected a matrix [I, H / {fmt.values_per_element}], got shape {list(ckpt.shape(first))}")
    inter, cols = ckpt.shape(first)
    hidden = cols * fmt.values_per_element
    if hidden % group or inter % group:
        raise ValueError(f"{first}: shape {[inter, cols]} does not hold whole groups of {group} (H = {hidden}, "
                         f"I = {inter})")
    if inter % tp_size or (inter // tp_size) % group:
        raise ValueError(f"tp_size = {tp_size}: I = {inter} must split into slices that are multiples of {group}")
    local = inter // tp_size

    # Every tensor's presence, dtype and shape, from the headers only, before reading weights.
    shapes = {"gate": (inter, hidden), "up": (inter, hidden), "down": (hidden, inter)}
    for layer in layer_ids:
        for expert in experts:
            for proj, shape in shapes.items():
                check_projection(ckpt, fmt, module(layer, expert, proj), shape)
    a1, a2 = (None, None) if fmt.activation_scales is None else fmt.activation_scales(ckpt, layer_ids, num_experts)

    if progress is None:
        progress = sys.stderr.isatty()
    from tqdm.auto import tqdm

    lo = tp_rank * local
    xor = np.uint8(fmt.nibble_xor)

    def source(layer, expert, proj, tensor):
        """The stored tensor, packed weights as their bytes uint8 [N, K/2]."""
        src = ckpt.tensor(f"{module(layer, expert, proj)}.{tensor}")
        return src.view(np.uint8) if tensor == fmt.packed else src

    def store(dst, src, tensor):
        """Packed bytes XORed into W4Weights' nibbles; scales widened to f32 (exact)."""
        if tensor == fmt.packed:
            np.bitwise_xor(src, xor, out=dst)
        else:
            dst[...] = src

    def block(bounds, tensor):
        shape = tuple(b - a for a, b in bounds)
        return np.empty(shape, np.uint8 if tensor == fmt.packed else np.float32)

    def read_w13(tensor):
        def read(bounds, bar):
            (l0, l1), (e0, e1), (n0, n1), (c0, c1) = bounds
            out = block(bounds, tensor)
            for i, layer in enumerate(layer_ids[l0:l1]):
                for j, expert in enumerate(experts[e0:e1]):
                    # rows [0, I/P) are the rank's gate rows, [I/P, 2I/P) its up rows
                    for proj, start in (("gate", 0), ("up", local)):
                        a, b = max(n0, start), min(n1, start + local)
                        if a < b:
                            src = source(layer, expert, proj, tensor)
                            store(out[i, j, a - n0:b - n0], src[lo + a - start:lo + b - start, c0:c1], tensor)
                            bar.update(1)
            return out
        return read

    def read_w2(tensor):
        per_column = 2 if tensor == fmt.packed else group  # input channels per stored column

        def read(bounds, bar):
            (l0, l1), (e0, e1), (n0, n1), (c0, c1) = bounds
            start = lo // per_column
            out = block(bounds, tensor)
            for i, layer in enumerate(layer_ids[l0:l1]):
                for j, expert in enumerate(experts[e0:e1]):
                    store(out[i, j], source(layer, expert, "down", tensor)[n0:n1, start + c0:start + c1], tensor)
                    bar.update(1)
            return out
        return read

    def tiled(read, full_cols):
        def read_tiled(bounds, bar):
            (n0, n1), (c0, c1) = bounds[2:]
            if (c0, c1) != (0, full_cols) or n0 % 16 or n1 % 16:
                raise ValueError(f"layout='tiled': a device block of a packed array must hold whole 16-row tiles and "
                                 f"every column, got rows [{n0}, {n1}) and columns [{c0}, {c1}) of {full_cols}; "
                                 "shard the layer, expert or row axis, or load with layout='checkpoint'")
            return tile_packed(read(bounds, bar))
        return read_tiled

    num_l, num_e = len(layer_ids), len(experts)
    plan = [
        ("w13.packed", (num_l, num_e, 2 * local, hidden // 2), read_w13(fmt.packed)),
        ("w13.scales", (num_l, num_e, 2 * local, hidden // group), read_w13(fmt.scale)),
        ("w2.packed", (num_l, num_e, hidden, local // 2), read_w2(fmt.packed)),
        ("w2.scales", (num_l, num_e, hidden, local // group), read_w2(fmt.scale)),
    ]
    if layout == "tiled":
        plan[0] = (*plan[0][:2], tiled(plan[0][2], hidden // 2))
        plan[2] = (*plan[2][:2], tiled(plan[2][2], local // 2))
    shardings = [_resolve_sharding(sharding, name, shape) for name, shape, _ in plan]
    total = 0
    for (name, shape, _), s in zip(plan, shardings):
        blocks = {tuple(sl.indices(n)[:2] for sl, n in zip(index, shape))
                  for index in s.addressable_devices_indices_map(shape).values()}
        per_pair = 2 if name.startswith("w13") else 1
        for b in blocks:
            total += (b[0][1] - b[0][0]) * (b[1][1] - b[1][0]) * per_pair
    with tqdm(total=total, desc="loading routed experts", unit="tensor", disable=not progress) as bar:
        arrays = [_place(name, shape, s, read, bar) for (name, shape, read), s in zip(plan, shardings)]

    def scales(name, values):
        if values is None:
            return None
        return jax.device_put(values, _resolve_sharding(sharding, name, values.shape))

    return MoEExperts(
        w13=W4Weights(arrays[0], arrays[1], group, layout),
        w2=W4Weights(arrays[2], arrays[3], group, layout),
        a1_scale=scales("a1_scale", a1), a2_scale=scales("a2_scale", a2), layers=tuple(layer_ids),
        activation_scaling=fmt.activation_scaling)
