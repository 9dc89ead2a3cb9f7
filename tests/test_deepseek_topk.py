"""deepseek_topk (step 0): the reference against a float64 transcription of DeepSeek-V3's
router (always), and the CUDA kernel against the reference (GPU tests), over one case list.

Reference vs. the float64 model: the package computes in f32, so sigmoid, the bias add and the
two-term group sums differ from float64 by < 1e-6. The chosen set can only differ on a row
where a selection boundary (last kept vs. first dropped group score, k-th vs. (k+1)-th biased
score) is closer than that, so rows with a margin below 1e-5 are not compared (with random
logits 0.1-1.2% of the rows in these cases; asserted at most 2 + 5% of them); every other row
must choose exactly the model's experts, with weights within 1e-6 relative (f32 sigmoid and
renormalization: a few f32 ulps). Cases built from a few well-separated values ("ties") have exact ties in f32 and
float64 alike and are compared exactly, order included.

CUDA vs. reference: the same f32 operations in the same order (w4afp8_jax/ops/deepseek_topk.py),
so the ids must be equal exactly, order included. The weights are bitwise equal when XLA's exp
and division agree with CUDA's expf and IEEE division (expected where XLA's GPU backend calls
libdevice's expf, which is CUDA's); WEIGHT_RTOL allows each of XLA's exp and division to differ by up to 2 ulps: the
score 1 / (1 + exp(-x)) then differs by at most 2 (exp, through 1 + e) + 2 (division) + 1
(rounding) = 5 ulps, the slot-order sum by 6 ulps relative, its inverse by 6 + 2 = 8 and the
weight score * inverse by 5 + 8 + 1 = 14 ulps: 16 ulps = 2**-20 relative.
"""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import numpy_model as ref
import w4afp8_jax as w4
from w4afp8_jax.ops.deepseek_topk import deepseek_topk_reference

MARGIN = 1e-5
WEIGHT_RTOL = 2.0**-20  # 16 f32 ulps (module docstring)

# (M, E, n_group, topk_group, top_k): DeepSeek-V3 (E = 256: 8 groups, keep 4, top-8) at decode
# and prefill sizes, small and large E, every group kept, one group kept, n_group = 32 and
# top_k = 32, groups that are not a power of two, n_group > 32, and E at the kernels' limit;
# the last three leave the kernel's last lane of every group partly empty (120 / 8 = 15 and
# 1000 / 8 = 125 experts over 4 lanes) or give each lane two groups of 2 (n_group = 45).
SHAPES = [
    (0, 256, 8, 4, 8), (1, 256, 8, 4, 8), (7, 256, 8, 4, 8), (64, 256, 8, 4, 8), (300, 256, 8, 4, 8),
    (7, 8, 4, 2, 3), (64, 8, 4, 4, 4), (7, 16, 4, 2, 3), (64, 16, 1, 1, 5), (300, 64, 8, 3, 6),
    (7, 64, 32, 16, 32), (64, 256, 8, 1, 32), (7, 96, 3, 2, 20), (7, 1024, 512, 100, 40), (7, 1024, 16, 4, 8),
    (7, 120, 8, 4, 8), (5, 1000, 8, 3, 9), (5, 90, 45, 20, 7),
]
# random: N(0, 2) logits and a small bias; no_bias: bias=None; negative_bias: biased scores
# mostly below 0; ties: logits from a few well-separated values and one bias value for all
# (exact ties in every row, and sums of different pairs well apart); nan: NaN logits scattered over the first rows (each group keeps 2 numbers), one row all
# NaN, +-inf logits and rows of -100 (every score underflows to 0).
PATTERNS = ["random", "no_bias", "negative_bias", "ties", "nan"]


def make_case(rng, m, e, pattern):
    logits = (rng.standard_normal((m, e)) * 2).astype(np.float32)
    bias = (rng.standard_normal(e) * 0.05).astype(np.float32)
    if pattern == "no_bias":
        bias = None
    elif pattern == "negative_bias":
        bias = (-0.8 + rng.standard_normal(e) * 0.2).astype(np.float32)
    elif pattern == "ties":
        logits = rng.choice(np.float32([-1.0, 0.0, 0.5, 2.0]), size=(m, e))
        bias = np.full(e, rng.choice([0.0, 0.25, -0.5]), np.float32)  # one value: pair sums stay apart
    elif pattern == "nan" and m:
        nan_rows = min(m, 4)
        for t in range(nan_rows):  # every other expert of a pair NaN: 2+ numbers left per group
            logits[t, rng.choice(e // 2, size=e // 8, replace=False) * 2] = np.nan
        logits[m - 1] = np.nan
        if m > 2:
            logits[m - 2, rng.choice(e, size=3, replace=False)] = [np.inf, -np.inf, np.inf]
            logits[m // 2] = -100.0
    return logits, bias


CASES = [pytest.param(*shape, pattern, id=f"{'-'.join(map(str, shape))}-{pattern}")
         for shape in SHAPES for pattern in PATTERNS]


def sort_by_id(ids, weights):
    order = np.argsort(ids, axis=1)
    return np.take_along_axis(ids, order, 1), np.take_along_axis(weights, order, 1)


def check_properties(ids, e, top_k, n_group, topk_group):
    """Distinct ids in range, from at most topk_group groups, on every row (any input)."""
    assert np.all((ids >= 0) & (ids < e))
    assert all(len(set(row)) == top_k for row in ids.tolist())
    per_group = e // n_group
    assert all(len(set((row // per_group).tolist())) <= topk_group for row in ids)


def check_against_model(logits, bias, top_k, n_group, topk_group, renormalize=True, fn=None, exact=False):
    fn = fn or (lambda lg, b: w4.deepseek_topk(lg, b, top_k=top_k, n_group=n_group, topk_group=topk_group,
                                                renormalize=renormalize, implementation="reference"))
    weights, ids = fn(jnp.asarray(logits), None if bias is None else jnp.asarray(bias))
    m, e = logits.shape
    assert weights.dtype == jnp.float32 and weights.shape == (m, top_k)
    assert ids.dtype == jnp.int32 and ids.shape == (m, top_k)
    weights, ids = np.asarray(weights), np.asarray(ids)
    check_properties(ids, e, top_k, n_group, topk_group)
    bias64 = np.zeros(e) if bias is None else bias.astype(np.float64)
    want_w, want_ids, margins = ref.deepseek_topk(logits.astype(np.float64), bias64, top_k, n_group, topk_group,
                                                   renormalize)
    scores = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
    raw = np.take_along_axis(scores, ids.astype(np.int64), 1)  # unbiased scores of the chosen experts
    np.testing.assert_allclose(weights, raw / raw.sum(1, keepdims=True) if renormalize else raw, rtol=1e-6)
    if exact:  # exact ties in f32 and float64 alike: same experts in the same order
        np.testing.assert_array_equal(ids, want_ids)
        np.testing.assert_allclose(weights, want_w, rtol=1e-6)
        return weights, ids
    # Against the model, on rows whose decisions are not within f32 noise of a tie.
    sure = margins > MARGIN
    assert (~sure).sum() <= 2 + 0.05 * m, f"{(~sure).sum()} of {m} rows near a tie"  # ~0.1-1.2% expected
    got_ids, got_w = sort_by_id(ids[sure], weights[sure])
    exp_ids, exp_w = sort_by_id(want_ids[sure], want_w[sure])
    np.testing.assert_array_equal(got_ids, exp_ids)
    np.testing.assert_allclose(got_w, exp_w, rtol=1e-6)
    return weights, ids


def check_nan_case(logits, bias, weights, ids, top_k, n_group, topk_group, renormalize):
    """The documented rules on the "nan" pattern's special rows; the other rows against the model."""
    m, e = logits.shape
    check_properties(ids, e, top_k, n_group, topk_group)
    bias64 = np.zeros(e) if bias is None else bias.astype(np.float64)
    underflow = np.all(logits == -100.0, axis=1)
    has_nan = np.any(np.isnan(logits), axis=1)
    for t in np.flatnonzero(has_nan | underflow):
        row = logits[t]
        if np.all(np.isnan(row)):  # every key NaN, all tied: the first groups, lowest ids first
            np.testing.assert_array_equal(ids[t], np.arange(top_k))
            assert np.all(np.isnan(weights[t]))
        elif underflow[t]:  # every score underflows to 0: uniform weights, not 0 / 0
            np.testing.assert_array_equal(weights[t], np.float32(1) / np.float32(top_k) if renormalize else 0.0)
        else:
            # NaN ranks below every number: the model with those experts' choice at -inf (which
            # is also below every number, and ties the same way, lower index first).
            nan = np.isnan(row)
            b = bias64.copy()
            b[nan] = -np.inf
            _, want_ids, margin = ref.deepseek_topk(np.where(nan, 0.0, row)[None].astype(np.float64), b, top_k,
                                                     n_group, topk_group, renormalize)
            if margin[0] > MARGIN:
                np.testing.assert_array_equal(np.sort(ids[t]), np.sort(want_ids[0]))
            chose_nan = np.isnan(row[ids[t]])
            if not chose_nan.any():
                assert np.all(np.isfinite(weights[t]))
            else:  # only when the kept groups hold fewer than top_k numbers
                assert np.all(np.isnan(weights[t]) == (chose_nan | renormalize))
    normal = ~(has_nan | underflow)
    if normal.any():
        check_against_model(logits[normal], bias, top_k, n_group, topk_group, renormalize,
                            fn=lambda lg, b: (jnp.asarray(weights[normal]), jnp.asarray(ids[normal])))


# ------------------------------------------------------------------------------------------
# The reference path (always)
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("m,e,n_group,topk_group,top_k,pattern", CASES)
def test_reference(rng, m, e, n_group, topk_group, top_k, pattern):
    logits, bias = make_case(rng, m, e, pattern)
    renormalize = bool(rng.integers(2)) if pattern == "random" else True
    kw = dict(top_k=top_k, n_group=n_group, topk_group=topk_group, renormalize=renormalize, implementation="reference")
    if m == 0:
        weights, ids = w4.deepseek_topk(jnp.asarray(logits), bias, **kw)
        assert (weights.shape, weights.dtype, ids.shape, ids.dtype) == ((0, top_k), jnp.float32, (0, top_k), jnp.int32)
        return
    if pattern == "nan":
        weights, ids = w4.deepseek_topk(jnp.asarray(logits), jnp.asarray(bias), **kw)
        check_nan_case(logits, bias, np.asarray(weights), np.asarray(ids), top_k, n_group, topk_group, renormalize)
    else:
        check_against_model(logits, bias, top_k, n_group, topk_group, renormalize, exact=pattern == "ties")


def test_bias_steers_selection_not_weights(rng):
    # A large bias on a random set of 8 experts inside one group forces that group and those
    # experts, whatever their scores; the weights stay the unbiased (renormalized) scores.
    e, m = 256, 16
    logits = (rng.standard_normal((m, e)) * 2).astype(np.float32)
    favored = rng.choice(np.arange(64, 96), size=8, replace=False)  # group 2
    bias = (rng.standard_normal(e) * 0.01).astype(np.float32)
    bias[favored] += 5.0
    weights, ids = check_against_model(logits, bias, 8, 8, 4)
    for row in ids:
        assert sorted(row.tolist()) == sorted(favored.tolist())
    s = 1.0 / (1.0 + np.exp(-logits[:, favored].astype(np.float64)))
    _, w_sorted = sort_by_id(ids, weights)
    np.testing.assert_allclose(w_sorted, (s / s.sum(1, keepdims=True))[:, np.argsort(favored)], rtol=1e-6)


def test_group_restriction_beats_raw_score(rng):
    # One expert with the highest score sits in a group whose other members are poor, so its
    # group's top-2 sum loses: that expert must not be chosen even though it is the best single one.
    e, n_group, per_group = 16, 4, 4
    logits = rng.uniform(0.5, 1.0, size=(1, e)).astype(np.float32)  # scores 0.62..0.73: top-2 sums >= 1.24
    g = int(rng.integers(0, n_group))
    logits[0, g * per_group:(g + 1) * per_group] = -6.0  # poor group ...
    star = g * per_group + int(rng.integers(0, per_group))
    logits[0, star] = 3.0  # ... with the best single expert (score 0.953; its group's top-2 sum 0.955 < 1.24)
    bias = (rng.standard_normal(e) * 1e-3).astype(np.float32)
    _, ids = check_against_model(logits, bias, 2, n_group, 2)
    assert star not in ids[0]


def test_ties_go_to_lower_index(rng):
    # Every expert with the same (random) score and bias: groups 0..topk_group-1 and the
    # lowest expert indices win, in index order.
    e, m = 256, 3
    logits = np.full((m, e), rng.standard_normal(), np.float32)
    bias = np.full(e, rng.standard_normal() * 0.1, np.float32)
    weights, ids = w4.deepseek_topk(jnp.asarray(logits), jnp.asarray(bias), top_k=8, n_group=8, topk_group=4)
    np.testing.assert_array_equal(np.asarray(ids), np.tile(np.arange(8), (m, 1)))
    np.testing.assert_allclose(np.asarray(weights), 1 / 8, rtol=1e-6)
    # 40 experts per group, top_k larger than a group: the first topk_group groups' lowest ids.
    logits = np.full((1, 160), rng.standard_normal(), np.float32)
    _, ids = w4.deepseek_topk(jnp.asarray(logits), jnp.zeros(160, jnp.float32) + 0.01, top_k=50, n_group=4,
                              topk_group=2)
    np.testing.assert_array_equal(np.asarray(ids)[0], np.arange(50))


def test_under_jit_and_bf16_logits(rng):
    logits = (rng.standard_normal((33, 256)) * 2).astype(ml_dtypes.bfloat16)
    bias = (rng.standard_normal(256) * 0.05).astype(np.float32)
    fn = jax.jit(lambda lg, b: w4.deepseek_topk(lg, b))
    check_against_model(logits, bias, 8, 8, 4, fn=fn)  # bf16 logits widen exactly to f32 / float64


def test_bias_is_optional_and_errors_name_the_argument(rng):
    logits = jnp.asarray(rng.standard_normal((5, 64)), jnp.float32)
    w_none, ids_none = w4.deepseek_topk(logits, None, top_k=4, n_group=8, topk_group=2)
    w_zero, ids_zero = w4.deepseek_topk(logits, jnp.zeros(64, jnp.float32), top_k=4, n_group=8, topk_group=2)
    np.testing.assert_array_equal(np.asarray(ids_none), np.asarray(ids_zero))
    np.testing.assert_array_equal(np.asarray(w_none), np.asarray(w_zero))
    with pytest.raises(ValueError, match=r"n_group = 8 .*at most 4"):  # E = 8 with the defaults
        w4.deepseek_topk(jnp.zeros((2, 8), jnp.float32))
    with pytest.raises(TypeError, match="renormalize"):
        w4.deepseek_topk(logits, None, top_k=4, n_group=8, topk_group=2, renormalize=None)


def test_gradient_is_that_of_the_chosen_weights(rng):
    # d loss / d logits with the choice held fixed, in float64: for chosen i, w_j = s_j / S, so
    # dw_j/dx_i = s_i (1 - s_i) (delta_ij / S - s_j / S^2); unchosen experts get 0.
    logits = (rng.standard_normal((4, 64)) * 2).astype(np.float32)
    bias = (rng.standard_normal(64) * 0.05).astype(np.float32)
    c = rng.standard_normal((4, 6))
    kw = dict(top_k=6, n_group=8, topk_group=3)
    grad = jax.grad(lambda lg: jnp.sum(w4.deepseek_topk(lg, bias, **kw)[0] * c))(jnp.asarray(logits))
    _, ids = w4.deepseek_topk(jnp.asarray(logits), bias, **kw)
    ids = np.asarray(ids)
    s = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
    want = np.zeros_like(s)
    for t in range(4):
        sc = s[t, ids[t]]
        total = sc.sum()
        jac = (np.eye(6) / total - sc[:, None] / total**2) * (sc * (1 - sc))[None, :]  # [j, i]
        want[t, ids[t]] = c[t] @ jac
    np.testing.assert_allclose(np.asarray(grad), want, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------------
# The CUDA kernel against the reference (GPU)
# ------------------------------------------------------------------------------------------
def run_poisoned(fn, *args):
    """Fills freshly freed device memory of the outputs' sizes with NaN / -1 before the call, so
    slots the kernel should have written but did not show up."""
    weights_shape, ids_shape = jax.eval_shape(fn, *args)
    poison = (jnp.full(weights_shape.shape, jnp.nan, jnp.float32).block_until_ready(),
              jnp.full(ids_shape.shape, -1, jnp.int32).block_until_ready())
    del poison
    return fn(*args)


def assert_same(got, want):
    (got_w, got_ids), (want_w, want_ids) = [(np.asarray(w), np.asarray(i)) for w, i in (got, want)]
    assert got_w.dtype == np.float32 and got_ids.dtype == np.int32 and got_w.shape == want_w.shape
    np.testing.assert_array_equal(got_ids, want_ids)
    np.testing.assert_array_equal(np.isnan(got_w), np.isnan(want_w))
    np.testing.assert_allclose(got_w, want_w, rtol=WEIGHT_RTOL, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("m,e,n_group,topk_group,top_k,pattern", CASES)
def test_cuda_matches_reference(rng, m, e, n_group, topk_group, top_k, pattern):
    logits, bias = make_case(rng, m, e, pattern)
    logits, bias = jnp.asarray(logits), None if bias is None else jnp.asarray(bias)
    for renormalize in (True, False):
        kw = dict(top_k=top_k, n_group=n_group, topk_group=topk_group, renormalize=renormalize)
        cuda = jax.jit(lambda lg, b: w4.deepseek_topk(lg, b, **kw, implementation="cuda"))
        got = run_poisoned(cuda, logits, bias)
        assert_same(got, w4.deepseek_topk(logits, bias, **kw, implementation="reference"))
        again = cuda(logits, bias)  # deterministic: bitwise the same on a second run
        np.testing.assert_array_equal(np.asarray(again[0]), np.asarray(got[0]))
        np.testing.assert_array_equal(np.asarray(again[1]), np.asarray(got[1]))
        if m and pattern != "nan":
            assert np.all(np.isfinite(np.asarray(got[0])))


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 64, 300])
def test_cuda_bf16_logits_eager_and_bias_dtypes(rng, m):
    logits = jnp.asarray(rng.standard_normal((m, 256)) * 2, jnp.bfloat16)  # the kernel reads bf16 itself
    bias = jnp.asarray(rng.standard_normal(256) * 0.05, jnp.bfloat16)
    got = w4.deepseek_topk(logits, bias, implementation="cuda")
    assert_same(got, deepseek_topk_reference(logits, bias, 8, 8, 4, True))
    logits16 = logits.astype(jnp.float16)  # cast to f32 before the kernel
    assert_same(w4.deepseek_topk(logits16, None, implementation="cuda"),
                deepseek_topk_reference(logits16, None, 8, 8, 4, True))


@pytest.mark.gpu
def test_cuda_gradient_and_limits(rng):
    logits = jnp.asarray(rng.standard_normal((16, 256)) * 2, jnp.float32)
    bias = jnp.asarray(rng.standard_normal(256) * 0.05, jnp.float32)
    c = jnp.asarray(rng.standard_normal((16, 8)), jnp.float32)
    grads = [jax.grad(lambda lg, impl=impl: jnp.sum(w4.deepseek_topk(lg, bias, implementation=impl)[0] * c))(logits)
             for impl in ("cuda", "reference")]
    np.testing.assert_allclose(np.asarray(grads[0]), np.asarray(grads[1]), rtol=1e-5, atol=1e-7)
    big = jnp.asarray(rng.standard_normal((2, 2048)), jnp.float32)
    with pytest.raises(ValueError, match="at most 1024"):
        w4.deepseek_topk(big, None, implementation="cuda")
    assert w4.deepseek_topk(big, None, implementation="auto")[1].shape == (2, 8)  # the reference takes E > 1024
