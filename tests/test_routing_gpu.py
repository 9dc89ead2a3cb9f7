"""CUDA route kernel (step 1) against the reference path: integer bookkeeping, so exact equality.

Shapes cover both kernel paths: one block for M * k <= 4096 slots, the multi-block count / scan /
rank path above (4096 slots per tile, the last tile partial in most cases)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import w4afp8_jax as w4
from w4afp8_jax.ops.route import route_reference

pytestmark = pytest.mark.gpu

PATTERNS = ("uniform", "one_expert", "sparse", "dropped")
BAD_IDS = np.array([-1, -7, -(2**31), 2**31 - 1, 1000, 5000], np.int64)  # plus E itself, added per case


def make_ids(rng, pattern, m, k, e):
    if pattern == "uniform":
        ids = rng.integers(0, e, size=(m, k))
    elif pattern == "one_expert":
        ids = np.full((m, k), rng.integers(0, e))
    elif pattern == "sparse":  # most experts empty, a skewed few take everything
        used = rng.choice(e, size=min(e, 3), replace=False)
        ids = used[rng.choice(len(used), size=(m, k), p=rng.dirichlet(np.ones(len(used)) * 0.3))]
    else:  # about a third of the slots dropped: -1, E (expert parallelism) and far-out values
        ids = rng.integers(0, e, size=(m, k))
        mask = rng.random((m, k)) < 0.35
        ids[mask] = rng.choice(np.append(BAD_IDS, e), size=int(mask.sum()))
    return ids.astype(np.int32)


def route_cuda(e):
    return jax.jit(lambda ids: w4.route(ids, e, implementation="cuda"))


def assert_same_routing(got, ids, e):
    want = route_reference(jnp.asarray(ids), e)
    for name, g, w in zip(got._fields, got, want):
        assert g.dtype == jnp.int32 and g.shape == w.shape, name
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w), err_msg=name)


# (M, k, E): one block at the small end (M <= 64 is the decode case), 4096 slots exactly at the
# one-block limit, and multi-block shapes with full and partial last tiles.
SHAPES = [
    (1, 1, 1), (1, 8, 256), (2, 6, 8), (3, 8, 1024), (7, 1, 256), (16, 8, 256), (64, 8, 256), (64, 6, 1024),
    (512, 8, 8), (1000, 1, 8), (1000, 8, 256), (1000, 6, 1024), (4097, 1, 256), (65536, 8, 256),
    (65536, 6, 1024), (65536, 1, 1),
]


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("m,k,e", SHAPES)
def test_route_matches_reference(rng, m, k, e, pattern):
    ids = make_ids(rng, pattern, m, k, e)
    assert_same_routing(route_cuda(e)(jnp.asarray(ids)), ids, e)


@pytest.mark.parametrize("m,k,e", [(7, 8, 8), (1000, 6, 256), (2000, 8, 1024)])
@pytest.mark.parametrize("offset", [1, 2, 3])
def test_route_misaligned_ids(rng, m, k, e, offset):
    """topk_ids as a slice at an odd element offset: the kernel's 16-byte loads need a scalar head."""
    ids = make_ids(rng, "dropped", m, k, e)
    big = np.concatenate([rng.integers(0, e, size=offset).astype(np.int32), ids.reshape(-1)])
    fn = jax.jit(lambda b: w4.route(b[offset:].reshape(m, k), e, implementation="cuda"))
    assert_same_routing(fn(jnp.asarray(big)), ids, e)


def test_route_narrow_dtype_ids(rng):
    """Non-int32 ids are clamped in Python before the kernel; out-of-range int8 values drop."""
    e = 8
    ids = rng.integers(-3, 12, size=(50, 8)).astype(np.int8)
    got = route_cuda(e)(jnp.asarray(ids))
    assert_same_routing(got, ids.astype(np.int32), e)


@pytest.mark.parametrize("m,k,e", [(64, 8, 256), (3000, 8, 256)])
def test_route_same_executable_new_routing(rng, m, k, e):
    """One jitted function, run repeatedly on different routings (and with enough work around
    the custom call for XLA to capture a command buffer): nothing may be baked in at capture."""
    @jax.jit
    def fn(a, b):
        ra = w4.route(a, e, implementation="cuda")
        rb = w4.route(b, e, implementation="cuda")
        return ra, rb, ra.positions * 2 + 1, rb.group_offsets - 1, ra.rows_per_expert + rb.rows_per_expert

    for pattern in ("uniform", "one_expert", "dropped", "sparse", "uniform"):
        a, b = make_ids(rng, pattern, m, k, e), make_ids(rng, "uniform", m, k, e)
        ra, rb, pos2, off1, rows = fn(jnp.asarray(a), jnp.asarray(b))
        assert_same_routing(ra, a, e)
        assert_same_routing(rb, b, e)
        np.testing.assert_array_equal(np.asarray(pos2), np.asarray(ra.positions) * 2 + 1)
        np.testing.assert_array_equal(np.asarray(off1), np.asarray(rb.group_offsets) - 1)
        np.testing.assert_array_equal(np.asarray(rows), np.asarray(ra.rows_per_expert) + np.asarray(rb.rows_per_expert))


def test_route_bad_input_raises_before_launch():
    ids = jnp.zeros((4, 2), jnp.int32)
    with pytest.raises(TypeError, match="topk_ids"):
        w4.route(jnp.zeros((4, 2), jnp.float32), 8, implementation="cuda")
    with pytest.raises(ValueError, match="rank 2"):
        w4.route(jnp.zeros((8,), jnp.int32), 8, implementation="cuda")
    for bad in (0, -1, 1025):
        with pytest.raises(ValueError, match="num_experts"):
            w4.route(ids, bad, implementation="cuda")
    with pytest.raises(TypeError, match="num_experts"):
        w4.route(ids, 8.0, implementation="cuda")
    with pytest.raises(ValueError, match="non-empty"):
        w4.route(jnp.zeros((0, 8), jnp.int32), 8, implementation="cuda")
