"""Step 0: DeepSeek-V3's grouped top-k router ("noaux_tc"), as a CUDA kernel and in pure JAX.

Both implementations compute the same operations in the same order, so they choose the same
experts and give bitwise-equal weights wherever their exp functions agree (both are accurate
to about 2 f32 ulps):

    score  = 1 / (1 + exp(-x))          written out, as the kernel computes it (XLA's CPU
                                        sigmoid is this formula too)
    biased = score + bias               f32; selection only
    group score = biased[a] + biased[b] for the group's two largest biased values a, b
    weights = score[id_j] * (1 / (score[id_0] + score[id_1] + ...))   sum in slot order

Selection ranks biased values by an int32 key that orders floats like `<` (with -0 == +0),
puts NaN below every number and the experts outside the kept groups below NaN; ties go to the
lower index (lax.top_k's rule and the kernel's).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from .. import _backend
from .._validate import MAX_EXPERTS, require_floating, require_rank, require_static_int

MASKED_KEY = np.int32(np.iinfo(np.int32).min)  # outside the kept groups: never chosen before a kept expert
NAN_KEY = np.int32(MASKED_KEY + 1)              # a NaN biased score: below every number


def ordered_key(v: jax.Array) -> jax.Array:
    """int32 keys of f32 values: key(a) > key(b) iff a > b; -0 and +0 share 0; NaN -> NAN_KEY.
    Non-NaN keys lie in [key(-inf), key(inf)] = [-2139095041, 2139095040]."""
    bits = jax.lax.bitcast_convert_type(v, jnp.int32)
    key = jnp.where(bits >= 0, bits, bits ^ np.int32(0x7FFFFFFF))
    return jnp.where(jnp.isnan(v), NAN_KEY, jnp.where(v == 0, np.int32(0), key))


def sigmoid(x: jax.Array) -> jax.Array:
    """f32 sigmoid as the kernel computes it: 1 / (1 + exp(-x))."""
    x = x.astype(jnp.float32)
    return 1 / (1 + jnp.exp(-x))


def select_experts(scores: jax.Array, bias: jax.Array | None, top_k: int, n_group: int,
                   topk_group: int) -> jax.Array:
    """int32 [M, top_k] expert ids in decreasing biased-score order (the reference selection)."""
    biased = scores if bias is None else scores + bias.astype(jnp.float32)[None, :]
    keys = ordered_key(biased)
    m, num_experts = keys.shape
    if topk_group < n_group:  # otherwise every group is kept
        per_group = num_experts // n_group
        _, top2 = jax.lax.top_k(keys.reshape(m, n_group, per_group), 2)
        best = jnp.take_along_axis(biased.reshape(m, n_group, per_group), top2, axis=-1)
        _, kept = jax.lax.top_k(ordered_key(best[..., 0] + best[..., 1]), topk_group)
        group_mask = jnp.zeros((m, n_group), bool).at[jnp.arange(m)[:, None], kept].set(True)
        keys = jnp.where(jnp.repeat(group_mask, per_group, axis=1), keys, MASKED_KEY)
    return jax.lax.top_k(keys, top_k)[1].astype(jnp.int32)


def chosen_weights(scores: jax.Array, ids: jax.Array, renormalize: bool) -> jax.Array:
    """The chosen experts' scores, times the inverse of their slot-order sum when renormalize
    (within 1.5 ulps of the quotient); a sum of 0
    (every chosen score underflowed to 0: logits below about -88) gives uniform weights."""
    w = jnp.take_along_axis(scores, ids, axis=1)
    if not renormalize:
        return w
    top_k = w.shape[1]
    total = w[:, 0]
    for j in range(1, top_k):  # slot order, as the kernel adds them
        total = total + w[:, j]
    total = total[:, None]
    # w * (1 / total), written so: XLA rewrites a division by a broadcast into this anyway, so
    # spelling it out keeps the kernel (which does the same) bitwise equal on every backend.
    inverse = 1 / jnp.where(total == 0, np.float32(1), total)  # no 1 / 0, not even in the unused branch
    return jnp.where(total == 0, np.float32(1) / np.float32(top_k), w * inverse)


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5))
def deepseek_topk_reference(logits: jax.Array, bias: jax.Array | None, top_k: int, n_group: int,
                            topk_group: int, renormalize: bool) -> tuple[jax.Array, jax.Array]:
    scores = sigmoid(logits)
    ids = select_experts(jax.lax.stop_gradient(scores), bias, top_k, n_group, topk_group)
    return chosen_weights(scores, ids, renormalize), ids


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3, 4, 5))
def _deepseek_topk_cuda(logits, bias, top_k: int, n_group: int, topk_group: int, renormalize: bool):
    m = logits.shape[0]
    if logits.dtype not in (jnp.float32, jnp.bfloat16):
        logits = logits.astype(jnp.float32)
    has_bias = bias is not None
    bias = bias.astype(jnp.float32) if has_bias else jnp.zeros((0,), jnp.float32)
    out_types = (jax.ShapeDtypeStruct((m, top_k), jnp.float32), jax.ShapeDtypeStruct((m, top_k), jnp.int32))
    return _backend.ffi_call("deepseek_topk", out_types)(
        logits, bias, top_k=np.int32(top_k), n_group=np.int32(n_group), topk_group=np.int32(topk_group),
        has_bias=has_bias, renormalize=bool(renormalize))


@_deepseek_topk_cuda.defjvp
def _deepseek_topk_cuda_jvp(top_k, n_group, topk_group, renormalize, primals, tangents):
    # The selection is piecewise constant: the tangent is that of the reference weights of the
    # chosen experts (plain JAX, so jax.grad can transpose it); ids get none, bias none.
    logits, bias = primals
    weights, ids = _deepseek_topk_cuda(logits, bias, top_k, n_group, topk_group, renormalize)
    _, weights_dot = jax.jvp(lambda lg: chosen_weights(sigmoid(lg), ids, renormalize), (logits,), (tangents[0],))
    return (weights, ids), (weights_dot, np.zeros(ids.shape, jax.dtypes.float0))


def deepseek_topk(logits, bias=None, *, top_k: int = 8, n_group: int = 8, topk_group: int = 4,
                  renormalize: bool = True, implementation: str = "auto") -> tuple[jax.Array, jax.Array]:
    """DeepSeek-V3's router: returns (topk_weights f32 [M, top_k], topk_ids int32 [M, top_k]).

    logits: float [M, E] (the gate's output; f32 or bf16 go to the kernel as they are, other
    float dtypes are cast to f32 first). bias: float [E] or None, the per-expert correction
    added to the scores for selection only (DeepSeek-V3's e_score_correction_bias).

    scores = sigmoid(logits) = 1 / (1 + exp(-logits)) in f32; each of the n_group groups of E /
    n_group consecutive experts is scored by the sum of its two best biased scores (scores +
    bias), the best topk_group groups are kept, and the top_k best biased scores inside them
    are chosen (experts of other groups never are). Ids come in decreasing biased-score order,
    ties to the lower expert (and group) index. The weights are the unbiased scores of the
    chosen experts, normalized to sum 1 when renormalize: each times 1 / (their sum, added in
    slot order), within 1.5 ulps of the quotient (if that sum is 0, because every
    chosen logit is below about -88 where the f32 sigmoid underflows, the weights are 1 /
    top_k). The routed scaling factor is applied later, in `combine`. This is the "noaux_tc"
    gate of DeepSeek-V3 (its MoEGate; SGLang's and vLLM's biased grouped top-k); the defaults
    are DeepSeek-V3's (E = 256: 8 groups, 4 kept, top-8).

    Non-finite input: a NaN biased score ranks below every number, so a token's ids stay
    distinct and in [0, E) whatever its logits; if a NaN expert has to be chosen (its kept
    groups hold fewer than top_k numbers), its weight is NaN, and with renormalize all of that
    token's weights are; no other token is affected. +-inf logits give scores 1
    and 0.

    M = 0 gives empty results. implementation: "auto" (the CUDA kernel when built and a GPU is
    present, else the reference), "cuda" (E <= 1024, the kernels' limit;
    "auto" takes the reference above that) or "reference"; both give the same ids and weights
    (see the module docstring).
    Differentiable with respect to logits on both paths: the gradient of the weights of the
    chosen experts (the choice itself is piecewise constant and passes none; bias gets none).

    Raises TypeError / ValueError naming the argument for a bad rank, dtype, size or setting.
    """
    require_rank("logits", logits, 2)
    require_floating("logits", logits)
    if bias is not None:
        require_rank("bias", bias, 1)
        require_floating("bias", bias)
    top_k, n_group, topk_group = (require_static_int(name, value) for name, value in
                                  (("top_k", top_k), ("n_group", n_group), ("topk_group", topk_group)))
    num_tokens, num_experts = np.shape(logits)
    if bias is not None and np.shape(bias)[0] != num_experts:
        raise ValueError(f"bias must have {num_experts} entries (one per expert), got {np.shape(bias)[0]}")
    if n_group < 1 or num_experts % n_group:
        raise ValueError(f"n_group = {n_group} must divide the number of experts {num_experts}")
    per_group = num_experts // n_group
    if per_group < 2:
        raise ValueError(f"n_group = {n_group} leaves {per_group} expert per group, but a group's score sums its "
                         f"2 best experts: with {num_experts} experts, n_group must divide {num_experts} and be at "
                         f"most {num_experts // 2} (each group needs at least 2 experts)")
    if not 1 <= topk_group <= n_group:
        raise ValueError(f"topk_group must be in [1, n_group = {n_group}], got {topk_group}")
    if not 1 <= top_k <= topk_group * per_group:
        raise ValueError(f"top_k must be in [1, topk_group * experts per group = {topk_group * per_group}], "
                         f"got {top_k}")
    if not isinstance(renormalize, (bool, np.bool_)):
        raise TypeError(f"renormalize must be a Python bool, got {type(renormalize).__name__}")
    impl = _backend.resolve(implementation)
    if impl == "cuda" and num_experts > MAX_EXPERTS:
        if implementation == "cuda":
            raise ValueError(f"logits has {num_experts} experts; the CUDA kernel takes at most {MAX_EXPERTS} "
                             '(use implementation="reference" or "auto")')
        impl = "reference"
    if num_tokens == 0:
        return jnp.zeros((0, top_k), jnp.float32), jnp.zeros((0, top_k), jnp.int32)
    logits = jnp.asarray(logits)
    bias = None if bias is None else jnp.asarray(bias)
    if impl == "cuda":
        return _deepseek_topk_cuda(logits, bias, top_k, n_group, topk_group, bool(renormalize))
    return deepseek_topk_reference(logits, bias, top_k, n_group, topk_group, bool(renormalize))
