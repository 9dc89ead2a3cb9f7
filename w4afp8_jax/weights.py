"""int4 expert weights with one f32 scale per `group_size` input channels."""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ._validate import MAX_EXPERTS, dtype_of, require_finite
from .fp8 import exact_divide

INT4_MIN, INT4_MAX = -8, 7
LAYOUTS = ("checkpoint", "tiled")
TILE_ROWS, TILE_GROUP = 16, 128  # the tiled layout's unit: 16 rows x one 128-wide K group


def pack_int4(values: jax.Array) -> jax.Array:
    """Packs signed int4 values [..., K] (K even) into uint8 [..., K//2].

    Element 2i goes to the low nibble and 2i+1 to the high nibble (the checkpoint order).
    numpy in, numpy out (packing on the host); anything else gives a JAX array.
    """
    if values.shape[-1] % 2:
        raise ValueError(f"values: last dimension must be even, got {values.shape[-1]}")
    nibbles = (values if isinstance(values, np.ndarray) else jnp.asarray(values)).astype(np.uint8) & 0xF
    return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)


def unpack_int4(packed: jax.Array) -> jax.Array:
    """Inverse of `pack_int4`: uint8 [..., K//2] -> int8 [..., K] with values in [-8, 7]."""
    packed = jnp.asarray(packed).astype(jnp.uint8)
    low = (packed & 0xF).astype(jnp.int8)
    high = (packed >> 4).astype(jnp.int8)
    pairs = jnp.stack([low, high], axis=-1)
    signed = (pairs ^ 8) - 8  # sign-extend the nibble
    return signed.reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def _xp(x):
    """numpy for host (numpy) arrays, so they stay on the host; jax.numpy for everything else
    (device arrays and tracers, which must never be converted to numpy)."""
    return np if isinstance(x, np.ndarray) else jnp


def check_tiled_shape(n: int, group_size: int) -> None:
    """The tiled layout's unit is 16 rows x one 128-wide K group."""
    if n % TILE_ROWS or group_size != TILE_GROUP:
        raise ValueError(f"the tiled layout needs N % {TILE_ROWS} == 0 and group_size {TILE_GROUP}, "
                         f"got N = {n}, group_size = {group_size}")


def _check_whole_blocks(n: int, half_k: int) -> None:
    if n % TILE_ROWS or half_k % (TILE_GROUP // 2):
        raise ValueError(f"packed: the tiled layout needs N % {TILE_ROWS} == 0 and K % {TILE_GROUP} == 0, "
                         f"got N = {n}, K = {2 * half_k}")


def tile_packed(packed: jax.Array) -> jax.Array:
    """Checkpoint order [..., N, K/2] -> the tiled order the CUDA kernels stream (numpy in,
    numpy out: host arrays are permuted on the host).

    Each (16-row tile, 128-wide K group) becomes one contiguous 1 KiB block, tiles then groups
    in order; inside a block, byte b of the 16-byte chunk t (K elements [32t, 32t+32) of the
    group) of row 8h + g sits at h*512 + (4g + t)*16 + b: exactly what MMA lane 4g + t needs
    for rows g and g + 8, so a warp reads each block as two fully coalesced 512-byte loads.
    """
    *lead, n, half_k = packed.shape
    _check_whole_blocks(n, half_k)
    blocks = packed.reshape(*lead, n // TILE_ROWS, 2, 8, half_k // 64, 4, 16)
    d = len(lead)
    order = [*range(d), d, d + 3, d + 1, d + 2, d + 4, d + 5]
    return _xp(packed).transpose(blocks, order).reshape(*lead, n, half_k)


def untile_packed(packed: jax.Array) -> jax.Array:
    """Inverse of `tile_packed`."""
    *lead, n, half_k = packed.shape
    _check_whole_blocks(n, half_k)
    blocks = packed.reshape(*lead, n // TILE_ROWS, half_k // 64, 2, 8, 4, 16)
    d = len(lead)
    order = [*range(d), d, d + 2, d + 3, d + 1, d + 4, d + 5]
    return _xp(packed).transpose(blocks, order).reshape(*lead, n, half_k)


def _is_array_like(x) -> bool:
    # Arrays, tracers and abstract shapes; not the placeholders pytree tools put in as leaves
    # (e.g. flax's ArrayRepr when printing a module).
    return isinstance(x, (np.ndarray, jax.Array, jax.ShapeDtypeStruct))


# Scales arrays already found finite, by id (held weakly). Every pytree map, layer(), prepare()
# and op call rebuilds W4Weights around the same scales object: checking each object once keeps
# a memory-mapped stack from being re-read and a device array from costing a sync per call.
_FINITE_SCALES: dict[int, weakref.ref] = {}


def _known_finite(scales) -> bool:
    known = _FINITE_SCALES.get(id(scales))
    return known is not None and known() is scales


def _mark_finite(scales) -> None:
    key = id(scales)
    _FINITE_SCALES[key] = weakref.ref(scales, lambda _, key=key: _FINITE_SCALES.pop(key, None))


def _require_finite_scales(scales) -> None:
    if isinstance(scales, (jax.core.Tracer, jax.ShapeDtypeStruct)):
        return  # cannot be inspected: a non-finite scale reaches only the outputs it multiplies
    if not _known_finite(scales):
        try:
            require_finite("scales", scales, "weight scales")
        except ValueError as error:  # where such scales usually come from, for whoever never passed scales
            raise ValueError(f"{error} (quantize_weights under jit gives a NaN scale to every group of weights "
                             "holding NaN or inf: check the weights it quantized)") from None
        _mark_finite(scales)


@dataclasses.dataclass(frozen=True)
class W4Weights:
    """Per-expert int4 weights, expert axis leading so the arrays shard along experts.

    packed: uint8 [..., E, N, K//2], two signed int4 per byte, element 2i in the low nibble.
        A checkpoint's int8 packing is accepted and reinterpreted bit for bit.
    scales: float32 [..., E, N, K//group_size]; dequantized weight = int4 * scale. bf16 or f16
        checkpoint scales are widened to f32 (exactly). Any finite value is valid (zero, e.g. for
        an all-zero group, and negative ones too: the math is int4 * scale either way); concrete
        scales holding NaN or +-inf raise ValueError naming the first, e.g. "scales[0, 3, 1] is
        nan". Traced scales (W4Weights built under jit) cannot be checked: a non-finite one
        reaches exactly the outputs it multiplies.
    group_size: static; input channels per scale (128 for W4AFP8 checkpoints).
    layout: static; "checkpoint" (the packing above) or "tiled" (see `prepare`).

    Row n of expert e computes output channel n from the K input channels: the weights are
    stored N-major ([E, N, K], as checkpoints store them), not [E, K, N] like the rhs of
    jax.lax.ragged_dot.

    Leading axes (e.g. a layer axis [L, E, N, K//2]) are batch axes: `W4Weights.stack(per_layer)`
    builds them, `layer(i)` selects one in place, and `jax.lax.scan` or `jax.vmap` over the
    weights peels them off. The ops (`grouped_gemm`, `moe`, ...) take exactly one [E, N, K//2]
    set per call.

    Host arrays: numpy inputs (np.load, jax.device_get, a safetensors reader; memory-mapped
    arrays included) stay numpy, converted on the host (int8 viewed as uint8, scales widened),
    so building W4Weights allocates no device memory; `jax.device_put(w, sharding)` places
    them, and the ops accept them as they are, under jit too (closed over or as arguments).
    The finiteness check of scales reads host scales once, in blocks, on the host (device scales
    on their device, only an index coming back); each scales array is checked once, however
    often W4Weights is rebuilt around it (pytree maps, `layer`, `selected`, `prepare`, op calls
    with device weights); a device copy of host scales is a new array, checked once there.

    Raises TypeError for packed other than uint8 / int8 or scales not floating point (naming the
    dtype passed) and ValueError for mismatched shapes, a bad group_size or layout, or
    non-finite concrete scales.
    """

    packed: jax.Array
    scales: jax.Array
    group_size: int = dataclasses.field(default=128, metadata={"static": True})
    layout: str = dataclasses.field(default="checkpoint", metadata={"static": True})
    # Set by `layer(i)`: these weights are entry `index` (an int32 scalar, traced or not) of the
    # stack [L, E, N, K//2] held in packed/scales.
    index: jax.Array | None = None

    def __post_init__(self):
        gs = self.group_size
        if isinstance(gs, bool) or not isinstance(gs, (int, np.integer)) or gs <= 0 or gs % 2:
            raise ValueError(f"group_size must be a positive even int, got {gs!r}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        # Pytree transformations rebuild the class with placeholders as leaves; only check arrays.
        if not (_is_array_like(self.packed) and _is_array_like(self.scales)):
            return
        packed, scales = self.packed, self.scales
        if packed.ndim < 3:
            raise ValueError(f"packed must be [..., E, N, K//2], got shape {tuple(packed.shape)}")
        if packed.dtype == np.int8:
            packed = (packed.view(np.uint8) if isinstance(packed, np.ndarray)
                      else jax.lax.bitcast_convert_type(packed, jnp.uint8))
        elif packed.dtype != np.uint8:
            raise TypeError(f"packed must be uint8 (or a checkpoint's int8), got {packed.dtype}")
        if not jnp.issubdtype(scales.dtype, jnp.floating):
            raise TypeError(f"scales must be floating point, got {scales.dtype}")
        if scales.dtype != np.float32:
            scales = scales.astype(np.float32) if isinstance(scales, np.ndarray) else jnp.asarray(scales, jnp.float32)
        *lead, e, n, half_k = packed.shape
        k = 2 * half_k
        if k == 0 or k % gs:
            raise ValueError(f"packed: K = {k} must be a positive multiple of group_size = {gs}")
        if tuple(scales.shape) != (*lead, e, n, k // gs):
            raise ValueError(
                f"scales must have shape {(*lead, e, n, k // gs)} to match packed {tuple(packed.shape)} "
                f"and group_size {gs}, got {tuple(scales.shape)}")
        if not 1 <= e <= MAX_EXPERTS:
            raise ValueError(f"packed: number of experts must be in [1, {MAX_EXPERTS}], got {e}")
        if self.layout == "tiled":
            check_tiled_shape(n, gs)
        _require_finite_scales(scales)
        object.__setattr__(self, "packed", packed)
        object.__setattr__(self, "scales", scales)

    def __repr__(self) -> str:
        def describe(x):
            if _is_array_like(x):
                return f"{np.dtype(x.dtype).name}{list(x.shape)}"
            return repr(x)
        index = "" if self.index is None else f", index={describe(self.index)}"
        return (f"W4Weights(packed={describe(self.packed)}, scales={describe(self.scales)}, "
                f"group_size={self.group_size}, layout={self.layout!r}{index})")

    @classmethod
    def stack(cls, layers: Sequence["W4Weights"]) -> "W4Weights":
        """Stacks L weight sets [E, N, K//2] into W4Weights [L, E, N, K//2] (select layer i with
        `layer(i)`). The sets must agree in shape, group_size and layout; NumPy sets give a NumPy
        stack (built on the host), anything else a JAX array (under jit too).

        Raises TypeError unless layers is a non-empty sequence of W4Weights, ValueError naming
        `layers[i]` for an already indexed `layer()` view, a set that is itself a stack, or a
        shape, group_size or layout different from layers[0]'s.
        """
        if isinstance(layers, W4Weights) or not isinstance(layers, Sequence):
            raise TypeError(f"layers must be a sequence of W4Weights (one per layer), got {type(layers).__name__}")
        if not layers:
            raise ValueError("layers must hold at least one W4Weights")
        first = layers[0]
        for i, w in enumerate(layers):
            name = f"layers[{i}]"
            if not isinstance(w, W4Weights):
                raise TypeError(f"{name} must be a W4Weights, got {type(w).__name__}")
            if w.index is not None:
                raise ValueError(f"{name} is a layer() view of a stack {tuple(np.shape(w.packed))}: pass the "
                                 f"weight sets themselves ({name}.selected() copies the layer out)")
            w.require_one_set(name)
            for what in ("group_size", "layout"):
                if getattr(w, what) != getattr(first, what):
                    raise ValueError(f"{name}.{what} is {getattr(w, what)!r}, layers[0]'s {getattr(first, what)!r}: "
                                     "a stack holds one kind of weights")
            if np.shape(w.packed) != np.shape(first.packed):
                raise ValueError(f"{name}.packed has shape {tuple(np.shape(w.packed))}, layers[0].packed "
                                 f"{tuple(np.shape(first.packed))}: every layer of a stack has the same [E, N, K//2]")
        host = all(isinstance(a, np.ndarray) for w in layers for a in (w.packed, w.scales))
        xp = np if host else jnp
        return cls(xp.stack([w.packed for w in layers]), xp.stack([w.scales for w in layers]),
                   first.group_size, first.layout)

    @property
    def num_experts(self) -> int:
        return self.packed.shape[-3]

    @property
    def out_features(self) -> int:
        return self.packed.shape[-2]

    @property
    def in_features(self) -> int:
        return 2 * self.packed.shape[-1]

    def checkpoint_packed(self) -> jax.Array:
        """packed in checkpoint order (two int4 per byte, K contiguous per row)."""
        packed = self.selected().packed
        return untile_packed(packed) if self.layout == "tiled" else packed

    def layer(self, index) -> "W4Weights":
        """Layer `index` of stacked weights [L, E, N, K//2], as a view that the CUDA kernels
        read in place on every jax version: the stack is passed whole with the index (a traced
        scalar is fine, e.g. the counter of a `lax.scan` over layers), so no layer is ever
        copied. Slicing the stack instead (`jax.tree.map(lambda a: a[i], w)`, scanning over the
        weights as xs, `fori_loop`, `vmap` or `nnx.scan` over the layer axis) avoids a copy only
        where XLA's dynamic-slice fusion passes the custom call a pointer into the stack: on by
        default from jaxlib 0.11.1, for slices along the layer axis indexed by a loop counter.
        With an older jaxlib, `--xla_gpu_enable_dynamic_slice_fusion=false` or an index that is
        not a loop counter, XLA copies the layer's weights first. A concrete index outside
        [0, L) raises ValueError; a traced one is clamped into [0, L) on both paths (the CUDA
        kernel clamps on the device; negative indices do not wrap)."""
        if self.index is not None or np.ndim(self.packed) != 4:
            raise ValueError(f"layer() needs a stack of weight sets [L, E, N, K//2], got packed "
                             f"{tuple(np.shape(self.packed))}" + (" already indexed" if self.index is not None else ""))
        index = jnp.asarray(index)
        if index.shape != () or not jnp.issubdtype(index.dtype, jnp.integer):
            raise ValueError(f"index must be an integer scalar, got {index.dtype}{list(index.shape)}")
        layers = np.shape(self.packed)[0]
        if not isinstance(index, jax.core.Tracer) and not 0 <= int(index) < layers:
            raise ValueError(f"index must be in [0, {layers}) for a stack of {layers} layers, got {int(index)}")
        return W4Weights(self.packed, self.scales, self.group_size, self.layout, index.astype(jnp.int32))

    def require_one_set(self, name: str) -> None:
        """Raises ValueError naming the argument unless these weights are one set [E, N, K//2]
        (a `layer()` view of a stack counts as one)."""
        if np.ndim(self.packed) != (3 if self.index is None else 4):
            raise ValueError(f"{name} must hold one layer's weights [E, N, K/2], got packed shape "
                             f"{tuple(np.shape(self.packed))} (select a layer of a stack with {name}.layer(i), "
                             "or scan or vmap over the leading axes)")

    def selected(self) -> "W4Weights":
        """The weight set itself ([E, N, K//2] arrays): indexes the stack of a `layer()` view."""
        if self.index is None:
            return self
        index = jnp.clip(self.index, 0, np.shape(self.packed)[0] - 1)  # the CUDA kernel's rule
        scales = jnp.asarray(self.scales)[index]
        if _known_finite(self.scales) and not isinstance(scales, jax.core.Tracer):
            _mark_finite(scales)  # a layer of checked scales: no second check (a device sync)
        return W4Weights(jnp.asarray(self.packed)[index], scales, self.group_size, self.layout)

    def prepare(self) -> "W4Weights":
        """The same weights in the tiled layout the CUDA kernels read fastest (one transpose,
        done once; numpy weights are permuted on the host; the math, `dequantize()` included,
        is unchanged). Raises ValueError unless N % 16 == 0 and group_size == 128."""
        if self.layout == "tiled":
            return self
        check_tiled_shape(self.out_features, self.group_size)
        return W4Weights(tile_packed(self.packed), self.scales, self.group_size, "tiled", self.index)

    def int4_values(self) -> jax.Array:
        """int8 [..., E, N, K] holding the int4 values."""
        return unpack_int4(self.checkpoint_packed())

    def dequantize(self) -> jax.Array:
        """float32 [..., E, N, K]: int4 value times its group's scale."""
        values = self.int4_values().astype(jnp.float32)
        *lead, k = values.shape
        grouped = values.reshape(*lead, k // self.group_size, self.group_size)
        return (grouped * jnp.asarray(self.selected().scales)[..., None]).reshape(*lead, k)


jax.tree_util.register_dataclass(W4Weights, data_fields=["packed", "scales", "index"],
                                 meta_fields=["group_size", "layout"])


def quantize_weights(w, group_size: int = 128) -> W4Weights:
    """Symmetric round-to-nearest int4 quantization of float weights [E, N, K].

    Scale rule: for each (expert, row, group of `group_size` input channels), scale = amax / 7,
    where amax is the group's largest magnitude, and q = clip(round(w / scale), -8, 7) (ties to
    even). The largest element maps to +-7, so nothing clips; an all-zero group gets scale 1 and
    q = 0.

    Non-finite weights: a concrete w (NumPy, a list, a JAX array) holding NaN or +-inf raises
    ValueError naming the first one, e.g. "w[3, 17, 250] is nan: weights must be finite", before
    anything is computed (NumPy input is checked on the host). A traced w (quantize_weights
    under jit) cannot be checked; there a group holding any NaN or inf gets scale NaN and codes
    0, so every output it contributes to is NaN (visibly wrong, never plausibly so), and every
    other group is quantized exactly as without it; such weights raise once they become concrete
    (returned from jit), as every W4Weights with a non-finite scale does. float64 weights are
    checked as the float32 values they are quantized from (beyond float32's range is inf).

    w: float [E, N, K], K a multiple of group_size. Returns W4Weights in the checkpoint layout:
    packed uint8 [E, N, K/2] (two int4 per byte, element 2i in the low nibble) and scales f32
    [E, N, K/group_size]; call `.prepare()` for the kernels' tiled layout. The arrays are
    jax.Arrays computed on JAX's default device whatever `w` is (for host-side quantization of
    a large checkpoint, run it under `jax.default_device(jax.devices("cpu")[0])`). The CUDA
    path needs group_size 128. Raises ValueError / TypeError naming w or group_size for a wrong
    rank, dtype (the dtype passed, e.g. int64) or size, or non-finite concrete weights.
    """
    if not isinstance(w, jax.Array):
        w = np.asarray(w)  # its dtype is the one passed (jnp.asarray narrows 64-bit ones); checked on the host
    if w.ndim != 3:
        raise ValueError(f"w must be [E, N, K], got shape {tuple(w.shape)}")
    w_dtype = dtype_of(w)
    if not jnp.issubdtype(w_dtype, jnp.floating):
        raise TypeError(f"w must be floating point, got {w_dtype}")
    e, n, k = w.shape
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0 or group_size % 2:
        raise ValueError(f"group_size must be a positive even int, got {group_size!r}")
    if k % group_size:
        raise ValueError(f"w: K = {k} must be a multiple of group_size = {group_size}")
    if dtype_of(w).itemsize > 4:  # the math is f32: check what it will see (1e39 is inf there)
        with np.errstate(over="ignore"):
            w = w.astype(np.float32)
    require_finite("w", w, "weights (as float32)" if dtype_of(w) != w_dtype else "weights")
    grouped = jnp.asarray(w).astype(jnp.float32).reshape(e, n, k // group_size, group_size)
    # Only a traced w can hold non-finite values here. They are kept out of the max and of the
    # int conversion (whose NaN results XLA leaves unspecified), so the rule above holds at any size.
    finite = jnp.isfinite(grouped)
    group_finite = jnp.all(finite, axis=-1)
    amax = jnp.max(jnp.where(finite, jnp.abs(grouped), 0.0), axis=-1)
    scales = jnp.where(amax > 0, exact_divide(amax, INT4_MAX), 1.0).astype(jnp.float32)
    q = jnp.clip(jnp.round(grouped / scales[..., None]), INT4_MIN, INT4_MAX)
    q = jnp.where(group_finite[..., None], q, 0).astype(jnp.int8)
    scales = jnp.where(group_finite, scales, jnp.nan)
    return W4Weights(pack_int4(q.reshape(e, n, k)), scales, group_size)
