"""Step 0: DeepSeek-V3's grouped top-k router (pure JAX; XLA fuses it)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .._validate import require_floating, require_rank


def deepseek_topk(logits, bias, *, top_k: int = 8, n_group: int = 8, topk_group: int = 4,
                  renormalize: bool = True) -> tuple[jax.Array, jax.Array]:
    """Returns (topk_weights f32 [M, top_k], topk_ids int32 [M, top_k]).

    scores = sigmoid(logits); selection ranks scores + bias: each of n_group groups of experts
    is scored by the sum of its two best biased scores, the best topk_group groups are kept,
    and the top_k biased scores inside them are chosen (experts of other groups are never
    chosen). The weights are the unbiased scores of the chosen experts, divided by their sum
    when renormalize. Ties go to the lower expert index. The routed scaling factor is applied
    later, in `combine`.
    """
    require_rank("logits", logits, 2)
    require_floating("logits", logits)
    require_rank("bias", bias, 1)
    require_floating("bias", bias)
    for name, value in (("top_k", top_k), ("n_group", n_group), ("topk_group", topk_group)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{name} must be a Python int, got {type(value).__name__}")
    num_experts = np.shape(logits)[1]
    if np.shape(bias)[0] != num_experts:
        raise ValueError(f"bias must have {num_experts} entries (one per expert), got {np.shape(bias)[0]}")
    if n_group < 1 or num_experts % n_group:
        raise ValueError(f"n_group = {n_group} must divide the number of experts {num_experts}")
    per_group = num_experts // n_group
    if not 1 <= topk_group <= n_group:
        raise ValueError(f"topk_group must be in [1, n_group = {n_group}], got {topk_group}")
    if per_group < 2:
        raise ValueError(f"each group needs at least 2 experts for its score, got {per_group}")
    if not 1 <= top_k <= topk_group * per_group:
        raise ValueError(f"top_k must be in [1, topk_group * experts per group = {topk_group * per_group}], got {top_k}")

    scores = jax.nn.sigmoid(jnp.asarray(logits).astype(jnp.float32))
    biased = scores + jnp.asarray(bias).astype(jnp.float32)[None, :]
    m = biased.shape[0]
    grouped = biased.reshape(m, n_group, per_group)
    group_scores = jnp.sum(jax.lax.top_k(grouped, 2)[0], axis=-1)
    _, kept_groups = jax.lax.top_k(group_scores, topk_group)
    group_mask = jnp.zeros((m, n_group), bool).at[jnp.arange(m)[:, None], kept_groups].set(True)
    expert_mask = jnp.repeat(group_mask, per_group, axis=1)
    _, topk_ids = jax.lax.top_k(jnp.where(expert_mask, biased, -jnp.inf), top_k)
    topk_weights = jnp.take_along_axis(scores, topk_ids, axis=1)
    if renormalize:
        topk_weights = topk_weights / jnp.sum(topk_weights, axis=1, keepdims=True)
    return topk_weights, topk_ids.astype(jnp.int32)
