"""Step 1 of the pipeline: rows per expert, group offsets and expert-sorted positions."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .. import _backend
from .._validate import require_integer, require_num_experts, require_rank

DROPPED = -1  # position of a slot whose expert id is outside [0, E)


class Routing(NamedTuple):
    """rows_per_expert int32 [E]; group_offsets int32 [E+1], exclusive prefix sums with
    group_offsets[E] = number of kept slots; positions int32 [M, k], the row of each
    (token, slot) in expert-sorted order (stable: ties keep token-major slot order), or -1
    for a dropped slot."""

    rows_per_expert: jax.Array
    group_offsets: jax.Array
    positions: jax.Array


def clamp_ids(topk_ids, num_experts: int):
    """int32 ids with every id outside [0, E) replaced by E (checked before any narrowing cast;
    a NumPy array stays on the host, so no 64-bit id can wrap when JAX narrows it)."""
    xp = np if isinstance(topk_ids, np.ndarray) else jnp
    valid = (topk_ids >= 0) & (topk_ids < num_experts)
    return xp.where(valid, topk_ids, num_experts).astype(xp.int32)


def route_reference(topk_ids: jax.Array, num_experts: int) -> Routing:
    m, k = topk_ids.shape
    key = clamp_ids(topk_ids, num_experts).reshape(-1)
    counts = jnp.zeros(num_experts + 1, jnp.int32).at[key].add(1)
    rows_per_expert = counts[:num_experts]
    group_offsets = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(rows_per_expert, dtype=jnp.int32)])
    order = jnp.argsort(key, stable=True)
    rank = jnp.zeros(m * k, jnp.int32).at[order].set(jnp.arange(m * k, dtype=jnp.int32))
    positions = jnp.where(key < num_experts, rank, DROPPED).reshape(m, k)
    return Routing(rows_per_expert, group_offsets, positions)


def empty_routing(num_tokens: int, top_k: int, num_experts: int) -> Routing:
    """The routing of no slots (M = 0 or k = 0): nothing counted, positions [M, k]."""
    return Routing(jnp.zeros(num_experts, jnp.int32), jnp.zeros(num_experts + 1, jnp.int32),
                   jnp.zeros((num_tokens, top_k), jnp.int32))


def _route_cuda(topk_ids: jax.Array, num_experts: int) -> Routing:
    m, k = topk_ids.shape
    ids = topk_ids if topk_ids.dtype == jnp.int32 else clamp_ids(topk_ids, num_experts)
    out_types = (
        jax.ShapeDtypeStruct((num_experts,), jnp.int32),
        jax.ShapeDtypeStruct((num_experts + 1,), jnp.int32),
        jax.ShapeDtypeStruct((m, k), jnp.int32),
        jax.ShapeDtypeStruct((_backend.route_workspace_elements(m * k, num_experts),), jnp.int32),
    )
    rows, offsets, positions, _ = _backend.ffi_call("route", out_types)(
        ids, num_experts=np.int32(num_experts))
    return Routing(rows, offsets, positions)


def route(topk_ids, num_experts: int, *, implementation: str = "auto") -> Routing:
    """Counts rows per expert and sorts (token, slot) pairs by expert, all on the device.

    topk_ids: integer [M, k] (device or host array; M = 0 or k = 0 give an empty routing:
    zero counts and offsets, positions [M, k]); ids outside [0, num_experts) mark dropped slots
    (expert parallelism uses id = E for experts held elsewhere), whatever their value.
    num_experts: Python int in [1, 1024]. Returns a `Routing`; raises ValueError / TypeError
    naming the argument for a bad rank, dtype or num_experts. Integer outputs: nothing to
    differentiate.
    """
    require_rank("topk_ids", topk_ids, 2)
    require_integer("topk_ids", topk_ids)
    num_experts = require_num_experts(num_experts)
    impl = _backend.resolve(implementation)
    m, k = np.shape(topk_ids)
    if m * k == 0:  # no kernel launch for an empty batch (shapes are static, so jit-safe)
        return empty_routing(m, k, num_experts)
    if not isinstance(topk_ids, jax.Array) and np.asarray(topk_ids).dtype.itemsize > 4:
        # Without x64, JAX narrows 64-bit host ids to int32 (2**32 + 1 would become expert 1).
        topk_ids = clamp_ids(np.asarray(topk_ids), num_experts)
    topk_ids = jnp.asarray(topk_ids)
    if impl == "cuda":
        return _route_cuda(topk_ids, num_experts)
    return route_reference(topk_ids, num_experts)
