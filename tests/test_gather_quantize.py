"""gather_quantize (step 2): one case list on every implementation; exact on both.

The step is one IEEE division and one round-to-nearest-even fp8 conversion per value, so the
reference path matches the NumPy model byte for byte (scales bit for bit, per tensor or per
token: every row carries its token's scale, rows no slot fills scale 1), and the CUDA path
(per-tensor scales only, so far) matches the reference
path (run on the CPU with the scale as a traced argument: an IEEE division, as in the kernel;
XLA's GPU f32 division is not always correctly rounded) byte for byte on the kept rows. Rows no
slot maps to are zero on the reference path and unspecified on the CUDA path (not compared).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import numpy_model as ref
import w4afp8_jax as w4
from helpers import fp8_bytes, on_every_implementation, reference_on_cpu, run_poisoned
from w4afp8_jax.fp8 import dynamic_scale
from w4afp8_jax.ops.gather_quantize import gather_quantize_reference
from w4afp8_jax.ops.route import route_reference
from w4afp8_jax.shapes import DEEPSEEK_V3

FP8_MAX = 448.0
H = DEEPSEEK_V3.hidden


def make_x(rng, m, h, saturate_scale=None):
    """bf16 activations with outliers; with saturate_scale, about 3% of the values lie beyond
    448 * saturate_scale (they must saturate to +-448, never become NaN)."""
    x = rng.standard_normal((m, h)).astype(np.float32)
    x[rng.random((m, h)) < 0.002] *= 50.0
    if saturate_scale is not None:
        x *= 200.0 * saturate_scale
    return jnp.asarray(x, jnp.bfloat16)


def routed_positions(rng, m, k, e, drop_fraction):
    """(positions int32 [M, k], kept rows) of the model's routing of random ids, about
    drop_fraction of the slots dropped (id = E, as expert parallelism marks them)."""
    ids = rng.integers(0, e, size=(m, k))
    ids[rng.random((m, k)) < drop_fraction] = e
    _, offsets, positions = ref.route(ids, e)
    return jnp.asarray(positions.astype(np.int32)), int(offsets[-1])


def check_against_model(got, got_scale, x, positions, scale):
    """Every kept slot's row is the model's fp8 row of its token (bytes), with its token's scale
    (per token: got_scale [M*k], 1 on rows no slot fills); other rows are zero."""
    m, k = positions.shape
    per_token = scale == "per_token"
    q_tok, want_scale = ref.quantize_fp8(np.asarray(x), None if per_token else scale, per_row=per_token)
    q = fp8_bytes(got)
    pos = np.asarray(positions)
    kept = pos >= 0
    tokens = np.broadcast_to(np.arange(m)[:, None], (m, k))
    np.testing.assert_array_equal(q[pos[kept]], fp8_bytes(q_tok)[tokens[kept]])
    unmapped = np.setdiff1d(np.arange(m * k), pos[kept])
    assert np.all(np.asarray(got)[unmapped].astype(np.float32) == 0)  # zero on the reference path
    if not per_token:
        assert np.float32(got_scale) == want_scale
        return
    got_scale = np.asarray(got_scale)
    assert got_scale.shape == (m * k,) and got_scale.dtype == np.float32
    np.testing.assert_array_equal(got_scale[pos[kept]], want_scale[tokens[kept]])
    assert np.all(got_scale[unmapped] == 1)


def check_against_reference(got, got_scale, x, positions, scale, kept):
    """The kept rows (at most `kept`, the rows route's positions fill) byte for byte."""
    ref_scale = dynamic_scale(x.astype(jnp.float32)) if scale is None else jnp.float32(scale)
    want = reference_on_cpu(gather_quantize_reference, x, positions, ref_scale)
    np.testing.assert_array_equal(np.asarray(got_scale), np.asarray(ref_scale))
    np.testing.assert_array_equal(fp8_bytes(got)[:kept], fp8_bytes(want)[:kept])


CASES = [pytest.param(m, k, h, scale_kind, id=f"{m}-{k}-{h}-{scale_kind}")
         for m, k, h in [(1, 8, H), (3, 6, 512), (13, 4, 384), (64, 8, H), (1000, 1, 256), (7, 8, 136),
                         (5, 2, 100), (300, 8, 2048)]
         for scale_kind in ("static", "dynamic", "saturating", "per_token")]


@pytest.mark.parametrize("implementation,m,k,h,scale_kind",
                         on_every_implementation(CASES, cuda=lambda *case: case[-1] != "per_token"))
def test_gather_quantize(rng, implementation, m, k, h, scale_kind):
    scale = {"static": 0.0173, "dynamic": None, "saturating": 0.02, "per_token": "per_token"}[scale_kind]
    x = make_x(rng, m, h, saturate_scale=scale if scale_kind == "saturating" else None)
    positions, kept = routed_positions(rng, m, k, 16, drop_fraction=0.2)
    fn = jax.jit(lambda x, p: w4.gather_quantize(x, p, scale, implementation=implementation))
    got, got_scale = run_poisoned(fn, x, positions)
    assert got.shape == (m * k, h) and got.dtype == jnp.float8_e4m3fn
    if implementation == "reference":
        check_against_model(got, got_scale, x, positions, scale)
    else:
        check_against_reference(got, got_scale, x, positions, scale, kept)
    q = np.asarray(got[:kept].astype(jnp.float32))
    assert not np.isnan(q).any() and np.abs(q).max(initial=0) <= FP8_MAX
    if scale_kind == "saturating":
        assert np.mean(np.abs(q) == FP8_MAX) > 0.005


@pytest.mark.parametrize("m,k,h", [(0, 4, 64), (3, 0, 64), (3, 2, 0), (0, 0, 0)])
def test_gather_quantize_per_token_empty(rng, m, k, h):
    """Empty inputs: the empty rows, and one scale per row (1: a token with no values)."""
    x = jnp.asarray(rng.standard_normal((m, h)), jnp.bfloat16)
    positions = jnp.asarray(rng.permutation(m * k).reshape(m, k), jnp.int32)
    run = lambda x, p: w4.gather_quantize(x, p, "per_token", implementation="reference")  # noqa: E731
    for fn in (run, jax.jit(run)):
        q, s = fn(x, positions)
        assert q.shape == (m * k, h) and q.dtype == jnp.float8_e4m3fn
        assert s.shape == (m * k,) and s.dtype == jnp.float32 and np.all(np.asarray(s) == 1)


def test_gather_quantize_per_token_non_finite_rows(rng):
    """The non-finite rules per row: a token's scale is over its finite values only (an inf
    saturates, a NaN stays in its element), a token with no finite value gets 1, and no token's
    inf, NaN or size reaches another token's scale or codes."""
    m, k = 5, 2
    x = rng.standard_normal((m, 256)).astype(np.float32)
    x[0, 5], x[1, 7], x[1, 8] = np.inf, -np.inf, np.nan
    x[2] = np.nan
    x[2, :3] = np.inf
    x[3] *= 1e6
    positions = jnp.asarray(rng.permutation(m * k).reshape(m, k), jnp.int32)
    xb = x.astype(ref.BF16)
    q, s = w4.gather_quantize(jnp.asarray(xb), positions, "per_token", implementation="reference")
    q, s, pos = np.asarray(q.astype(jnp.float32)), np.asarray(s), np.asarray(positions)
    x32 = xb.astype(np.float32)
    for t in range(m):
        finite = np.abs(x32[t][np.isfinite(x32[t])])
        want = np.float32(finite.max()) / np.float32(448) if finite.size else np.float32(1)
        assert np.all(s[pos[t]] == want), t
        alone, _ = ref.quantize_fp8(x32[t:t + 1], float(want))  # the token quantized on its own
        for row in q[pos[t]]:
            np.testing.assert_array_equal(row, alone[0].astype(np.float32))
    assert q[pos[0], 5].tolist() == [448.0] * k and q[pos[1], 7].tolist() == [-448.0] * k
    assert np.isnan(q[pos[1], 8]).all() and np.isnan(q).sum() == k * (1 + 253)


# ---------------------------------------------------------------------------------------------
# CUDA path only: positions outside the routing contract, steps 1 and 2 in one executable
# ---------------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_gather_quantize_rows_follow_positions(rng):
    """Hand-made positions: a permutation of some rows, the rest out of range in every way
    (-1, M*k, huge, negative); the named rows are written, nothing else is required."""
    m, k, h = 40, 4, 256
    rows = m * k
    perm = rng.permutation(rows).reshape(m, k).astype(np.int64)
    bad = rng.random((m, k)) < 0.3
    perm[bad] = rng.choice(np.array([-1, rows, rows + 7, 2**31 - 1, -(2**31)]), size=int(bad.sum()))
    positions = jnp.asarray(perm.astype(np.int32))
    x = make_x(rng, m, h)
    fn = jax.jit(lambda x, p, s: w4.gather_quantize(x, p, s, implementation="cuda")[0])
    for x_run in (x, make_x(rng, m, h)):  # a second x: every named row must change with it
        want = fp8_bytes(reference_on_cpu(gather_quantize_reference, x_run, positions, jnp.float32(0.01)))
        got = fp8_bytes(fn(x_run, positions, jnp.float32(0.01)))
        named = perm[(perm >= 0) & (perm < rows)]
        np.testing.assert_array_equal(got[named], want[named])


@pytest.mark.gpu
def test_gather_quantize_after_cuda_route(rng):
    """Steps 1 and 2 back to back on the CUDA path inside one jit, rerun with new data."""
    m, k, e, h = 64, DEEPSEEK_V3.top_k, DEEPSEEK_V3.experts, H

    @jax.jit
    def prep(x, ids):
        r = w4.route(ids, e, implementation="cuda")
        q, _ = w4.gather_quantize(x, r.positions, 0.05, implementation="cuda")
        return q, r.group_offsets

    for _ in range(3):
        ids = rng.integers(-1, e + 1, size=(m, k)).astype(np.int32)
        x = make_x(rng, m, h)
        q, offsets = prep(x, jnp.asarray(ids))
        r = route_reference(jnp.asarray(ids), e)
        want = reference_on_cpu(gather_quantize_reference, x, r.positions, jnp.float32(0.05))
        kept = int(r.group_offsets[-1])
        np.testing.assert_array_equal(np.asarray(offsets), np.asarray(r.group_offsets))
        np.testing.assert_array_equal(fp8_bytes(q)[:kept], fp8_bytes(want)[:kept])
