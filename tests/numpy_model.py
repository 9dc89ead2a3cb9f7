"""An independent float64 NumPy model of docs/numerics.md, written from the contract alone.

Nothing here imports w4afp8_jax: the tests compare the package's reference path against this
transcription. Conventions taken from the spec:
- int4 values are signed in [-8, 7], packed two per byte along K, element 2i in the low
  nibble and 2i+1 in the high nibble; weights are [E, N_out, K/2]; dequantized weight =
  int4 * scale with one scale per (expert, output row, group of 128 input channels).
- fp8 is e4m3 (ml_dtypes.float8_e4m3fn), q = saturate(x / scale) to [-448, 448], rounded to
  nearest even. Activation scales are f32 scalars, or per token one f32 scale per row, and the
  quantization divides in f32 (the spec's "f32 math"); a dynamic scale is max(amax / 448,
  2**-126) in f32 over the finite values (of the tensor, or of the row), and 1 when that amax
  is below 2**-126 (docs/numerics.md, "Scale range", "Per-token activation scales").
- Expert ids outside [0, E) are dropped slots. Rows are ordered by expert id, stable
  (ties keep token-major slot order).
- GEMM outputs and the combine output are bf16; everything in between is exact or float64
  here, with the roundings the spec names (bf16 c1 / c2 / out, fp8 q1 / q2) reproduced.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

FP8 = ml_dtypes.float8_e4m3fn
BF16 = ml_dtypes.bfloat16
FP8_MAX = 448.0

# Signed value of every nibble 0..15: 0..7 -> 0..7, 8..15 -> -8..-1.
_NIBBLE_VALUE = np.array([n - 16 if n >= 8 else n for n in range(16)], dtype=np.int8)
# For every byte: (value of its low nibble, value of its high nibble).
_BYTE_PAIRS = np.stack([_NIBBLE_VALUE[np.arange(256) & 0xF], _NIBBLE_VALUE[np.arange(256) >> 4]], axis=1)
_BYTE_PAIRS_F64 = _BYTE_PAIRS.astype(np.float64)


# ---------------------------------------------------------------------------------------------
# int4 weights
# ---------------------------------------------------------------------------------------------
def unpack_int4(packed) -> np.ndarray:
    """uint8 (or the same bytes as int8) [..., K/2] -> int8 [..., K], element 2i = low nibble."""
    b = np.asarray(packed).view(np.uint8) if np.asarray(packed).dtype == np.int8 else np.asarray(packed, np.uint8)
    pairs = _BYTE_PAIRS[b]  # [..., K/2, 2]: (element 2i, element 2i+1)
    return pairs.reshape(*b.shape[:-1], 2 * b.shape[-1])


def pack_int4(values) -> np.ndarray:
    """int [..., K] in [-8, 7] -> uint8 [..., K/2], written byte by byte from the nibble rule."""
    v = np.asarray(values, np.int64)
    assert v.shape[-1] % 2 == 0 and v.min() >= -8 and v.max() <= 7
    nib = (v & 0xF).astype(np.uint8)  # two's complement low 4 bits
    return (nib[..., 0::2] | (nib[..., 1::2] << 4)).astype(np.uint8)


def dequantize(packed, scales, group_size: int) -> np.ndarray:
    """float64 [..., N, K]: int4 value times the f32 scale of its group (exact in float64)."""
    b = np.asarray(packed).view(np.uint8)
    *lead, half_k = b.shape
    k = 2 * half_k
    g = _BYTE_PAIRS_F64[b].reshape(*lead, k // group_size, group_size)  # the same unpacking, as float64
    g *= np.asarray(scales, np.float64)[..., None]
    return g.reshape(*lead, k)


# ---------------------------------------------------------------------------------------------
# fp8 / bf16 rounding
# ---------------------------------------------------------------------------------------------
def to_fp8(v_f32) -> np.ndarray:
    """Saturate to [-448, 448] then round to nearest even e4m3 (ml_dtypes: no saturation, so
    clipping first is what makes overflow land on +-448 instead of NaN)."""
    return np.clip(np.asarray(v_f32, np.float32), -FP8_MAX, FP8_MAX).astype(FP8)


def to_bf16(v) -> np.ndarray:
    """Round a float64 value to bf16 the way an f32 accumulator is rounded: f64 -> f32 -> bf16."""
    return np.asarray(v, np.float64).astype(np.float32).astype(BF16)


def dynamic_scale(v, per_row: bool = False):
    """max(amax / 448, 2**-126) in f32, amax over the finite |v|; 1 when amax < 2**-126 (an
    all-zero, empty, subnormal-only or non-finite-only tensor). per_row: the same for every row
    of v [R, C], f32 [R]."""
    if per_row:
        return np.array([dynamic_scale(row) for row in np.asarray(v)], np.float32).reshape(len(v))
    v = np.abs(np.asarray(v, np.float32))
    finite = v[np.isfinite(v)]
    amax = np.float32(finite.max()) if finite.size else np.float32(0)
    tiny = np.finfo(np.float32).tiny
    return np.float32(max(amax / np.float32(FP8_MAX), tiny)) if amax >= tiny else np.float32(1.0)


def quantize_fp8(x, scale=None, per_row: bool = False):
    """(q fp8, scale f32): q = saturate(f32(x) / scale) with the division done in f32; per_row
    (x [R, C], scale None): one dynamic scale per row, f32 [R]."""
    x32 = np.asarray(x, np.float32)
    s = dynamic_scale(x32, per_row) if scale is None else np.float32(scale)
    with np.errstate(over="ignore"):  # a quotient past f32 is inf, which saturates like any |v| > 448
        return to_fp8(x32 / (s[:, None] if per_row else s)), s


def fp8_ordinal(q) -> np.ndarray:
    """Integer position of each fp8 value on the number line: adjacent representable values
    differ by 1, +0 and -0 are both 0 (e4m3 bytes are sign-magnitude)."""
    bits = np.asarray(q).view(np.uint8).astype(np.int64)
    mag = bits & 0x7F
    return np.where(bits & 0x80, -mag, mag)


def bf16_ulp(v) -> np.ndarray:
    """Spacing of bf16 numbers at |v| (8 significant bits): 2^(floor(log2|v|) - 7)."""
    a = np.maximum(np.abs(np.asarray(v, np.float64)), 2.0 ** -126)
    return 2.0 ** (np.floor(np.log2(a)) - 7)


# ---------------------------------------------------------------------------------------------
# Step 1: routing
# ---------------------------------------------------------------------------------------------
def route(topk_ids, num_experts: int):
    """(rows_per_expert [E], group_offsets [E+1], positions [M, k] with -1 for dropped slots),
    by a plain Python stable sort of the kept (token, slot) pairs by expert id."""
    ids = np.asarray(topk_ids)
    m, k = ids.shape
    flat = [int(v) for v in ids.reshape(-1)]  # Python ints: no overflow for any integer dtype
    kept = [i for i, e in enumerate(flat) if 0 <= e < num_experts]
    order = sorted(kept, key=lambda i: flat[i])  # sorted() is stable
    positions = np.full(m * k, -1, np.int64)
    for row, i in enumerate(order):
        positions[i] = row
    counts = np.zeros(num_experts, np.int64)
    for i in kept:
        counts[flat[i]] += 1
    offsets = np.concatenate([[0], np.cumsum(counts)])
    return counts, offsets, positions.reshape(m, k)


# ---------------------------------------------------------------------------------------------
# Steps 3 / 5: grouped GEMM
# ---------------------------------------------------------------------------------------------
def grouped_gemm(lhs, lhs_scale, packed, scales, group_offsets, group_size: int, *, with_abs: bool = False):
    """float64 [R, N]: rows offsets[e]..offsets[e+1] of lhs times expert e's dequantized
    weights, times lhs_scale (a scalar, or one per row [R]); rows at or past offsets[E] are 0.
    Only experts with rows are unpacked. with_abs also returns the same sum over |terms| (the
    scale of accumulation error).

    The spec sums each group's int4 * fp8 products, scales them and accumulates; in float64 the
    products and group sums are exact, so multiplying by the dequantized weight is the same sum
    up to float64 rounding (~1e-16 relative), far below every tolerance used with it.
    """
    lhs = np.asarray(lhs).astype(np.float64)
    num_rows = lhs.shape[0]
    num_experts, n, _ = np.shape(packed)
    offsets = [int(o) for o in np.asarray(group_offsets)]
    out = np.zeros((num_rows, n))
    out_abs = np.zeros((num_rows, n)) if with_abs else None
    for e in range(num_experts):
        lo, hi = offsets[e], offsets[e + 1]
        if hi <= lo:
            continue
        w = dequantize(np.asarray(packed[e]), np.asarray(scales[e]), group_size)  # [N, K]
        out[lo:hi] = lhs[lo:hi] @ w.T
        if with_abs:
            out_abs[lo:hi] = np.abs(lhs[lo:hi]) @ np.abs(w).T
    scale = np.asarray(lhs_scale, np.float64)
    scale = scale[:, None] if scale.ndim else float(scale)
    out *= scale
    if with_abs:
        return out, out_abs * np.abs(scale)
    return out


def grouped_gemm_wgmma(lhs, lhs_scale, packed, scales, group_offsets, group_size: int = 128, bits: int = 14):
    """float64 [R, N]: grouped_gemm with precision=DEFAULT's accumulation (docs/numerics.md): each
    group sum formed by K = 32 instructions from zero, every instruction truncating its 32
    products and the incoming sum toward zero to `bits` significant bits of the largest of them
    before adding, the sum rounded to f32; group sums scaled into an f32 accumulator. The
    tests' model of the wgmma error (it reproduces the H100's measurements: tests/test_grouped_gemm.py)."""
    lhs = np.asarray(lhs).astype(np.float64)
    num_experts, n, _ = np.shape(packed)
    offsets = [int(o) for o in np.asarray(group_offsets)]
    out = np.zeros((lhs.shape[0], n))
    f32 = lambda v: v.astype(np.float32).astype(np.float64)  # noqa: E731
    for e in range(num_experts):
        lo, hi = offsets[e], offsets[e + 1]
        if hi <= lo:
            continue
        w = unpack_int4(packed[e]).astype(np.float64)  # [N, K]
        s = np.asarray(scales[e], np.float64)  # [N, G]
        acc = np.zeros((hi - lo, n))
        for g in range(w.shape[1] // group_size):
            total = np.zeros((hi - lo, n))
            for k0 in range(g * group_size, (g + 1) * group_size, 32):
                terms = np.concatenate([total[..., None], lhs[lo:hi, None, k0:k0 + 32] * w[None, :, k0:k0 + 32]], -1)
                largest = np.abs(terms).max(axis=-1, keepdims=True)
                quantum = 2.0 ** (np.floor(np.log2(np.where(largest > 0, largest, 1.0))) - (bits - 1))
                total = f32(np.sum(np.trunc(terms / quantum) * quantum, axis=-1))
            acc = f32(acc + total * s[None, :, g])
        out[lo:hi] = acc
    return out * float(np.float32(lhs_scale))


# ---------------------------------------------------------------------------------------------
# Step 4: SiLU and mul
# ---------------------------------------------------------------------------------------------
def silu_mul(c1) -> np.ndarray:
    """float64 h = silu(c1[:, :I]) * c1[:, I:], silu(g) = g / (1 + exp(-g))."""
    c = np.asarray(c1).astype(np.float64)
    inter = c.shape[1] // 2
    gate, up = c[:, :inter], c[:, inter:]
    return gate / (1.0 + np.exp(-gate)) * up


# ---------------------------------------------------------------------------------------------
# Step 6: combine
# ---------------------------------------------------------------------------------------------
def combine(rows, positions, topk_weights, routed_scaling_factor: float, *, rounded: bool = True) -> np.ndarray:
    """bf16 [M, H]: rsf * sum over kept slots of weight * rows[position], in float64
    (rounded=False: the float64 value before the final bf16 rounding)."""
    rows = np.asarray(rows).astype(np.float64)
    pos = np.asarray(positions)
    w = np.asarray(topk_weights, np.float64)
    m, k = pos.shape
    acc = np.zeros((m, rows.shape[1]))
    for t in range(m):
        for j in range(k):
            if pos[t, j] >= 0:
                acc[t] += w[t, j] * rows[pos[t, j]]
    acc *= routed_scaling_factor
    return to_bf16(acc) if rounded else acc


# ---------------------------------------------------------------------------------------------
# Steps 1-6: the MoE layer
# ---------------------------------------------------------------------------------------------
def moe(x, topk_ids, topk_weights, w13_packed, w13_scales, w2_packed, w2_scales, group_size: int = 128,
        *, a1_scale=None, a2_scale=None, activation_scaling: str = "per_tensor", routed_scaling_factor: float = 1.0,
        return_intermediates=False):
    """bf16 [M, H] following docs/numerics.md steps 1-6, with its roundings:
    q1 = fp8(x / a1) (dynamic a1 = amax|x| / 448), c1 = bf16(GEMM1), h = silu(gate) * up,
    q2 = fp8(h / a2) (dynamic a2 = amax|h| / 448 over the kept rows), c2 = bf16(GEMM2),
    out = bf16(rsf * sum_j w_j c2[pos]). activation_scaling="per_token": a1 per token (a row of
    x; every row of q1 copied from token t has token t's scale) and a2 per kept row of h."""
    per_token = activation_scaling == "per_token"
    x32 = np.asarray(x).astype(np.float32)
    num_experts = np.shape(w13_packed)[0]
    _, offsets, positions = route(topk_ids, num_experts)
    m, k = positions.shape
    kept_rows = int(offsets[-1])

    q1_tok, s1 = quantize_fp8(x32, a1_scale, per_token)  # every copy of a token's row is the same fp8 row
    q1 = np.zeros((kept_rows, x32.shape[1]), FP8)
    s1_rows = np.zeros(kept_rows, np.float32)
    for t in range(m):
        for j in range(k):
            if positions[t, j] >= 0:
                q1[positions[t, j]] = q1_tok[t]
                s1_rows[positions[t, j]] = s1[t] if per_token else s1
    c1 = to_bf16(grouped_gemm(q1, s1_rows if per_token else s1, w13_packed, w13_scales, offsets, group_size))
    h = silu_mul(c1)
    q2, s2 = quantize_fp8(h, a2_scale, per_token)
    c2_exact = grouped_gemm(q2, s2, w2_packed, w2_scales, offsets, group_size)
    c2 = to_bf16(c2_exact)
    # combine over [kept_rows, H]: dropped slots have position -1 and are skipped.
    out = combine(c2, positions, topk_weights, routed_scaling_factor)
    if return_intermediates:
        return out, dict(q1=q1, s1=s1, c1=c1, h=h, q2=q2, s2=s2, c2=c2, c2_exact=c2_exact, offsets=offsets,
                         positions=positions)
    return out


def moe_one_q2_flip(token: int, im: dict, topk_weights, w2_packed, w2_scales, group_size: int = 128,
                    routed_scaling_factor: float = 1.0):
    """Yield bf16 [I, H] per expert that `token` keeps: its output row when one code of that
    expert's q2 row takes the other rounding of h / a2 (the neighbouring fp8 value on the other
    side of it), one candidate row per code. Slots naming the same expert hold the same
    computation, so the code moves in all of them. im: moe's intermediates.

    An implementation that accumulates a GEMM in f32 rather than float64 can move a c1 value by
    one bf16 ulp, and that moves a q2 code when h / a2 lies that close to a rounding boundary:
    a legitimate difference that changes the token's whole output row slightly (tests/test_moe.py).
    """
    q2, h, c2 = im["q2"], im["h"], im["c2"].astype(np.float64)
    row_scale = lambda p: im["s2"][p] if np.ndim(im["s2"]) else im["s2"]  # noqa: E731
    positions, offsets = im["positions"], im["offsets"]
    w = np.asarray(topk_weights, np.float64)[token]
    slots = {}  # expert -> [(slot, position)]
    for j, p in enumerate(positions[token]):
        if p >= 0:
            slots.setdefault(int(np.searchsorted(offsets, p, side="right") - 1), []).append((j, int(p)))
    acc = sum(w[j] * c2[p] for same in slots.values() for j, p in same)
    for expert, same in slots.items():
        p = same[0][1]
        s2 = row_scale(p)
        v = (h[p].astype(np.float32) / s2).astype(np.float64)
        q = q2[p].astype(np.float64)
        step = np.sign(v - q) * (np.abs(q) < FP8_MAX)  # toward v; a saturated code has no other side
        ordinal = fp8_ordinal(q2[p]) + step.astype(np.int64)
        bits = (np.abs(ordinal) | np.where(ordinal < 0, 0x80, 0)).astype(np.uint8)
        dq = np.where(step != 0, bits.view(FP8).astype(np.float64) - q, 0.0)  # [I]
        w2 = dequantize(np.asarray(w2_packed[expert]), np.asarray(w2_scales[expert]), group_size)  # [H, I]
        c2_alt = to_bf16(im["c2_exact"][p][None, :] + (dq * float(s2))[:, None] * w2.T).astype(np.float64)
        weight = sum(w[j] for j, _ in same)
        yield to_bf16(routed_scaling_factor * (acc + weight * (c2_alt - c2[p])))


# ---------------------------------------------------------------------------------------------
# Step 0: DeepSeek-V3 router (noaux_tc grouped top-k)
# ---------------------------------------------------------------------------------------------
def deepseek_topk(logits, bias, top_k: int = 8, n_group: int = 8, topk_group: int = 4, renormalize: bool = True):
    """Per token, in float64: scores = sigmoid(logits); choice = scores + bias; group score =
    sum of the group's two largest choice values; keep the topk_group best groups; take the
    top_k largest choice values among the kept groups' experts (ties: lower index first);
    weights = the unbiased scores of those experts, renormalized to sum 1.

    Returns (weights [M, top_k], ids [M, top_k], margins [M]): ids in decreasing choice order;
    margin = the smallest gap at a selection boundary (last kept vs. first dropped group score,
    k-th vs. (k+1)-th choice value among the kept groups; inf where nothing is dropped), so a
    caller can tell on which rows an f32 implementation must choose the same set.
    """
    logits = np.asarray(logits, np.float64)
    bias = np.asarray(bias, np.float64)
    m, num_experts = logits.shape
    per_group = num_experts // n_group
    ids = np.zeros((m, top_k), np.int64)
    weights = np.zeros((m, top_k))
    margins = np.zeros(m)
    for t in range(m):
        scores = 1.0 / (1.0 + np.exp(-logits[t]))
        choice = scores + bias
        group_scores = []
        for g in range(n_group):
            members = sorted(choice[g * per_group:(g + 1) * per_group], reverse=True)
            group_scores.append(members[0] + members[1])
        group_order = sorted(range(n_group), key=lambda g: -group_scores[g])  # stable: lower g first
        kept_groups = group_order[:topk_group]
        candidates = [e for g in sorted(kept_groups) for e in range(g * per_group, (g + 1) * per_group)]
        cand_order = sorted(candidates, key=lambda e: -choice[e])  # stable: lower expert first
        chosen = cand_order[:top_k]
        ids[t] = chosen
        w = scores[chosen]
        weights[t] = w / w.sum() if renormalize else w
        gaps = [np.inf]
        if topk_group < n_group:
            gaps.append(group_scores[group_order[topk_group - 1]] - group_scores[group_order[topk_group]])
        if top_k < len(cand_order):
            gaps.append(choice[cand_order[top_k - 1]] - choice[cand_order[top_k]])
        margins[t] = min(gaps)
    return weights, ids, margins
