"""deepseek_topk (step 0) against a direct float64 transcription of DeepSeek-V3's router.

The package computes in f32 and the model in float64: sigmoid, the bias add and the two-term
group sums differ by < 1e-6. The chosen set can only differ on a row where a selection
boundary (last kept vs. first dropped group score, k-th vs. (k+1)-th biased score) is closer
than that, so rows with a margin below 1e-5 are not compared (with random logits they are
rare: asserted < 5% of the rows); every other row must choose exactly the model's experts,
with weights within 1e-6 relative (f32 sigmoid and renormalization: a few f32 ulps)."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import numpy_model as ref
import w4afp8_jax as w4

MARGIN = 1e-5


def sort_by_id(ids, weights):
    order = np.argsort(ids, axis=1)
    return np.take_along_axis(ids, order, 1), np.take_along_axis(weights, order, 1)


def check_against_model(logits, bias, top_k, n_group, topk_group, renormalize=True, fn=None):
    fn = fn or (lambda lg, b: w4.deepseek_topk(lg, b, top_k=top_k, n_group=n_group, topk_group=topk_group,
                                                renormalize=renormalize))
    weights, ids = fn(jnp.asarray(logits), jnp.asarray(bias))
    m, e = logits.shape
    assert weights.dtype == jnp.float32 and weights.shape == (m, top_k)
    assert ids.dtype == jnp.int32 and ids.shape == (m, top_k)
    weights, ids = np.asarray(weights), np.asarray(ids)
    want_w, want_ids, margins = ref.deepseek_topk(logits.astype(np.float64), bias.astype(np.float64), top_k,
                                                   n_group, topk_group, renormalize)
    # Intrinsic properties on every row: distinct ids in range, at most topk_group groups used.
    assert np.all((ids >= 0) & (ids < e))
    assert all(len(set(row)) == top_k for row in ids.tolist())
    per_group = e // n_group
    assert all(len(set((row // per_group).tolist())) <= topk_group for row in ids)
    scores = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
    raw = np.take_along_axis(scores, ids.astype(np.int64), 1)  # unbiased scores of the chosen experts
    np.testing.assert_allclose(weights, raw / raw.sum(1, keepdims=True) if renormalize else raw, rtol=1e-6)
    if renormalize:
        np.testing.assert_allclose(weights.sum(1), 1.0, rtol=1e-6)
    # Against the model, on rows whose decisions are not within f32 noise of a tie.
    sure = margins > MARGIN
    assert sure.mean() >= 0.95, f"{(~sure).sum()} of {m} rows near a tie"
    got_ids, got_w = sort_by_id(ids[sure], weights[sure])
    exp_ids, exp_w = sort_by_id(want_ids[sure], want_w[sure])
    np.testing.assert_array_equal(got_ids, exp_ids)
    np.testing.assert_allclose(got_w, exp_w, rtol=1e-6)
    return weights, ids


@pytest.mark.parametrize("m", [1, 7, 64, 500])
def test_deepseek_v3_config(rng, m):
    # E=256, 8 groups of 32, keep 4 groups, top-8; bias of the size of DeepSeek-V3's correction.
    logits = (rng.standard_normal((m, 256)) * 2).astype(np.float32)
    bias = (rng.standard_normal(256) * 0.05).astype(np.float32)
    check_against_model(logits, bias, 8, 8, 4)


@pytest.mark.parametrize("e,top_k,n_group,topk_group", [(16, 3, 4, 2), (64, 6, 8, 3), (8, 2, 1, 1), (32, 1, 16, 16),
                                                        (256, 32, 8, 1)])
@pytest.mark.parametrize("renormalize", [True, False])
def test_other_configs(rng, e, top_k, n_group, topk_group, renormalize):
    logits = rng.standard_normal((40, e)).astype(np.float32)
    bias = (rng.standard_normal(e) * 0.2).astype(np.float32)
    check_against_model(logits, bias, top_k, n_group, topk_group, renormalize)


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
    # lowest expert indices win.
    e, m = 256, 3
    logits = np.full((m, e), rng.standard_normal(), np.float32)
    bias = np.full(e, rng.standard_normal() * 0.1, np.float32)
    weights, ids = w4.deepseek_topk(jnp.asarray(logits), jnp.asarray(bias), top_k=8, n_group=8, topk_group=4)
    np.testing.assert_array_equal(np.sort(np.asarray(ids), 1), np.tile(np.arange(8), (m, 1)))
    np.testing.assert_allclose(np.asarray(weights), 1 / 8, rtol=1e-6)
    _, want_ids, _ = ref.deepseek_topk(logits, bias, 8, 8, 4)
    np.testing.assert_array_equal(np.sort(np.asarray(ids), 1), np.sort(want_ids, 1))
    # 40 experts per group, top_k larger than a group: the first topk_group groups' lowest ids.
    logits = np.full((1, 160), rng.standard_normal(), np.float32)
    _, ids = w4.deepseek_topk(jnp.asarray(logits), jnp.zeros(160, jnp.float32) + 0.01, top_k=50, n_group=4,
                              topk_group=2)
    np.testing.assert_array_equal(np.sort(np.asarray(ids)[0]), np.arange(50))


def test_under_jit_and_bf16_logits(rng):
    logits = (rng.standard_normal((33, 256)) * 2).astype(ml_dtypes.bfloat16)
    bias = (rng.standard_normal(256) * 0.05).astype(np.float32)
    fn = jax.jit(lambda lg, b: w4.deepseek_topk(lg, b))
    check_against_model(logits, bias, 8, 8, 4, fn=fn)  # bf16 logits widen exactly to f32 / float64
