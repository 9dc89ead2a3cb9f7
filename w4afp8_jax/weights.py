"""int4 expert weights with one f32 scale per `group_size` input channels."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from ._validate import MAX_EXPERTS
from .fp8 import exact_divide

INT4_MIN, INT4_MAX = -8, 7
LAYOUTS = ("checkpoint", "tiled")
TILE_ROWS, TILE_GROUP = 16, 128  # the tiled layout's unit: 16 rows x one 128-wide K group


def pack_int4(values: jax.Array) -> jax.Array:
    """Packs signed int4 values [..., K] (K even) into uint8 [..., K//2].

    Element 2i goes to the low nibble and 2i+1 to the high nibble (the checkpoint order).
    """
    if values.shape[-1] % 2:
        raise ValueError(f"values: last dimension must be even, got {values.shape[-1]}")
    nibbles = jnp.asarray(values).astype(jnp.uint8) & 0xF
    return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)


def unpack_int4(packed: jax.Array) -> jax.Array:
    """Inverse of `pack_int4`: uint8 [..., K//2] -> int8 [..., K] with values in [-8, 7]."""
    packed = jnp.asarray(packed).astype(jnp.uint8)
    low = (packed & 0xF).astype(jnp.int8)
    high = (packed >> 4).astype(jnp.int8)
    pairs = jnp.stack([low, high], axis=-1)
    signed = (pairs ^ 8) - 8  # sign-extend the nibble
    return signed.reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def tile_packed(packed: jax.Array) -> jax.Array:
    """Checkpoint order [..., N, K/2] -> the tiled order the CUDA kernels stream.

    Each (16-row tile, 128-wide K group) becomes one contiguous 1 KiB block, tiles then groups
    in order; inside a block, byte b of the 16-byte chunk t (K elements [32t, 32t+32) of the
    group) of row 8h + g sits at h*512 + (4g + t)*16 + b: exactly what MMA lane 4g + t needs
    for rows g and g + 8, so a warp reads each block as two fully coalesced 512-byte loads.
    """
    *lead, n, half_k = packed.shape
    blocks = packed.reshape(*lead, n // TILE_ROWS, 2, 8, half_k // 64, 4, 16)
    d = len(lead)
    order = [*range(d), d, d + 3, d + 1, d + 2, d + 4, d + 5]
    return jnp.transpose(blocks, order).reshape(*lead, n, half_k)


def untile_packed(packed: jax.Array) -> jax.Array:
    """Inverse of `tile_packed`."""
    *lead, n, half_k = packed.shape
    blocks = packed.reshape(*lead, n // TILE_ROWS, half_k // 64, 2, 8, 4, 16)
    d = len(lead)
    order = [*range(d), d, d + 2, d + 3, d + 1, d + 4, d + 5]
    return jnp.transpose(blocks, order).reshape(*lead, n, half_k)


def _is_array_like(x) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


@dataclasses.dataclass(frozen=True)
class W4Weights:
    """Per-expert int4 weights, expert axis leading so the arrays shard along experts.

    packed: uint8 [E, N, K//2], two signed int4 per byte, element 2i in the low nibble.
        A checkpoint's int8 packing is accepted and reinterpreted bit for bit.
    scales: float32 [E, N, K//group_size]; dequantized weight = int4 * scale. bf16 or f16
        checkpoint scales are widened to f32 (exactly).
    group_size: static; input channels per scale (128 for W4AFP8 checkpoints).

    Row n of expert e computes output channel n from the K input channels.
    """

    packed: jax.Array
    scales: jax.Array
    group_size: int = dataclasses.field(default=128, metadata={"static": True})
    layout: str = dataclasses.field(default="checkpoint", metadata={"static": True})

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
        if packed.ndim != 3:
            raise ValueError(f"packed must be [E, N, K//2], got shape {tuple(packed.shape)}")
        if packed.dtype == jnp.int8:
            packed = jax.lax.bitcast_convert_type(jnp.asarray(packed), jnp.uint8)
        elif packed.dtype != jnp.uint8:
            raise TypeError(f"packed must be uint8 (or a checkpoint's int8), got {packed.dtype}")
        if scales.ndim != 3:
            raise ValueError(f"scales must be [E, N, K//group_size], got shape {tuple(scales.shape)}")
        if not jnp.issubdtype(scales.dtype, jnp.floating):
            raise TypeError(f"scales must be floating point, got {scales.dtype}")
        if scales.dtype != jnp.float32:
            scales = jnp.asarray(scales).astype(jnp.float32)
        e, n, half_k = packed.shape
        k = 2 * half_k
        if k == 0 or k % gs:
            raise ValueError(f"packed: K = {k} must be a positive multiple of group_size = {gs}")
        if scales.shape != (e, n, k // gs):
            raise ValueError(
                f"scales must have shape {(e, n, k // gs)} to match packed {tuple(packed.shape)} "
                f"and group_size {gs}, got {tuple(scales.shape)}")
        if not 1 <= e <= MAX_EXPERTS:
            raise ValueError(f"packed: number of experts must be in [1, {MAX_EXPERTS}], got {e}")
        if self.layout == "tiled" and (n % TILE_ROWS or gs != TILE_GROUP):
            raise ValueError(f"the tiled layout needs N % {TILE_ROWS} == 0 and group_size {TILE_GROUP}, "
                             f"got N = {n}, group_size = {gs}")
        object.__setattr__(self, "packed", packed)
        object.__setattr__(self, "scales", scales)

    @property
    def num_experts(self) -> int:
        return self.packed.shape[0]

    @property
    def out_features(self) -> int:
        return self.packed.shape[1]

    @property
    def in_features(self) -> int:
        return 2 * self.packed.shape[2]

    def checkpoint_packed(self) -> jax.Array:
        """packed in checkpoint order (two int4 per byte, K contiguous per row)."""
        return untile_packed(self.packed) if self.layout == "tiled" else self.packed

    def prepare(self) -> "W4Weights":
        """The same weights in the tiled layout the CUDA kernels read fastest (one transpose,
        done once; the math, `dequantize()` included, is unchanged). Needs N % 16 == 0 and
        group_size 128."""
        if self.layout == "tiled":
            return self
        return W4Weights(tile_packed(self.packed), self.scales, self.group_size, "tiled")

    def int4_values(self) -> jax.Array:
        """int8 [E, N, K] holding the int4 values."""
        return unpack_int4(self.checkpoint_packed())

    def dequantize(self) -> jax.Array:
        """float32 [E, N, K]: int4 value times its group's scale."""
        values = self.int4_values().astype(jnp.float32)
        e, n, k = values.shape
        grouped = values.reshape(e, n, k // self.group_size, self.group_size)
        return (grouped * self.scales[..., None]).reshape(e, n, k)


jax.tree_util.register_dataclass(W4Weights, data_fields=["packed", "scales"], meta_fields=["group_size", "layout"])


def quantize_weights(w, group_size: int = 128) -> W4Weights:
    """Symmetric round-to-nearest int4 quantization of float weights [E, N, K].

    Scale rule: for each (expert, row, group of `group_size` input channels), scale = amax / 7,
    where amax is the group's largest magnitude, and q = clip(round(w / scale), -8, 7) (ties to
    even). The largest element maps to +-7, so nothing clips; an all-zero group gets scale 1 and
    q = 0.
    """
    w = jnp.asarray(w)
    if w.ndim != 3:
        raise ValueError(f"w must be [E, N, K], got shape {tuple(w.shape)}")
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise TypeError(f"w must be floating point, got {w.dtype}")
    e, n, k = w.shape
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0 or group_size % 2:
        raise ValueError(f"group_size must be a positive even int, got {group_size!r}")
    if k % group_size:
        raise ValueError(f"w: K = {k} must be a multiple of group_size = {group_size}")
    grouped = w.astype(jnp.float32).reshape(e, n, k // group_size, group_size)
    amax = jnp.max(jnp.abs(grouped), axis=-1)
    scales = jnp.where(amax > 0, exact_divide(amax, INT4_MAX), 1.0).astype(jnp.float32)
    q = jnp.clip(jnp.round(grouped / scales[..., None]), INT4_MIN, INT4_MAX).astype(jnp.int8)
    return W4Weights(pack_int4(q.reshape(e, n, k)), scales, group_size)
