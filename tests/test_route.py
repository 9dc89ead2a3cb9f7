"""route (step 1): rows per expert, exclusive offsets, stable expert-sorted positions.

Routing is integer bookkeeping, so every comparison is exact: the reference path against the
NumPy model, the CUDA path against the reference path (on the CPU). The case list covers both
CUDA kernel paths: one block for M * k <= 4096 slots, the multi-block count / scan / rank path
above (4096 slots per tile, the last tile partial in most cases).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import numpy_model as ref
import w4afp8_jax as w4
from helpers import EVERY_IMPLEMENTATION, on_every_implementation, reference_on_cpu
from w4afp8_jax.shapes import DEEPSEEK_V3_TP4

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


def check_route(ids, num_experts, routing):
    """Exact agreement with the model plus the invariants the later steps rely on."""
    counts, offsets, positions = ref.route(np.asarray(ids), num_experts)
    assert routing.rows_per_expert.dtype == jnp.int32 and routing.rows_per_expert.shape == (num_experts,)
    assert routing.group_offsets.dtype == jnp.int32 and routing.group_offsets.shape == (num_experts + 1,)
    assert routing.positions.dtype == jnp.int32 and routing.positions.shape == np.shape(ids)
    np.testing.assert_array_equal(np.asarray(routing.rows_per_expert), counts)
    np.testing.assert_array_equal(np.asarray(routing.group_offsets), offsets)
    np.testing.assert_array_equal(np.asarray(routing.positions), positions)
    # Invariants: kept positions are a permutation of [0, offsets[E]); each lands in its expert's
    # segment; inside a segment, token-major slot order is kept (stability).
    pos = np.asarray(routing.positions).reshape(-1)
    flat = np.asarray(ids).reshape(-1)
    kept = pos >= 0
    np.testing.assert_array_equal(kept, (flat >= 0) & (flat < num_experts))
    np.testing.assert_array_equal(np.sort(pos[kept]), np.arange(int(offsets[-1])))
    expert = flat[kept].astype(np.int64)
    assert np.all((offsets[expert] <= pos[kept]) & (pos[kept] < offsets[expert + 1]))
    by_expert = pos[kept][np.argsort(expert, kind="stable")]  # slot order within each expert
    assert np.all(np.diff(by_expert) > 0)
    return routing


def assert_same_routing(got, ids, e):
    """Exact equality with the reference path on the CPU."""
    want = reference_on_cpu(route_fn(e, "reference"), jnp.asarray(ids))
    for name, g, w in zip(got._fields, got, want):
        assert g.dtype == jnp.int32 and g.shape == w.shape, name
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w), err_msg=name)


@functools.cache
def route_fn(e, implementation):
    """route jitted, one function per (E, implementation): cases of one shape compile once."""
    return jax.jit(lambda ids: w4.route(ids, e, implementation=implementation))


# The case list, (M, k, E) x pattern: one block at the small end (M <= 64 is the decode case),
# 4096 slots exactly at the one-block limit, and multi-block shapes with full and partial last
# tiles.
SHAPES = [
    (1, 1, 1), (1, 8, 256), (2, 6, 8), (3, 8, 256), (3, 8, 1024), (5, 3, 2), (7, 1, 256), (7, 6, 16),
    (16, 8, 256), (64, 8, 256), (64, 6, 1024), (100, 2, 1024),
    (512, 8, 8), (1000, 1, 8), (1000, 8, 256), (1000, 6, 1024), (4097, 1, 256), (65536, 8, 256),
    (65536, 6, 1024), (65536, 1, 1),
]
CASES = [pytest.param(m, k, e, pattern, id=f"{m}-{k}-{e}-{pattern}") for m, k, e in SHAPES for pattern in PATTERNS]


def one_block(m, k, e, pattern):
    """The reference path runs the shapes of up to 1024 slots: larger ones exercise only the CUDA
    kernels' multi-block tiling, and the model's Python sort makes them slow on the CPU."""
    return m * k <= 1024


@pytest.mark.parametrize("implementation,m,k,e,pattern", on_every_implementation(CASES, reference=one_block))
def test_route(rng, implementation, m, k, e, pattern):
    ids = make_ids(rng, pattern, m, k, e)
    got = route_fn(e, implementation)(jnp.asarray(ids))
    if implementation == "reference":
        check_route(ids, e, got)
    else:
        assert_same_routing(got, ids, e)


@pytest.mark.parametrize("implementation", EVERY_IMPLEMENTATION)
@pytest.mark.parametrize("m,k", [(1, 8), (37, 8), (512, 4)])
def test_all_slots_one_expert(rng, implementation, m, k):
    e = DEEPSEEK_V3_TP4.experts
    hot = int(rng.integers(0, e))
    ids = np.full((m, k), hot, np.int32)
    r = check_route(ids, e, w4.route(jnp.asarray(ids), e, implementation=implementation))
    counts = np.asarray(r.rows_per_expert)
    assert counts[hot] == m * k and counts.sum() == m * k
    # Stable: the sorted order is the token-major slot order itself.
    np.testing.assert_array_equal(np.asarray(r.positions), np.arange(m * k).reshape(m, k))


@pytest.mark.parametrize("implementation", EVERY_IMPLEMENTATION)
def test_empty_experts_and_skew(rng, implementation):
    e = 64
    used = rng.choice(e, size=5, replace=False)  # 59 empty experts
    p = rng.dirichlet(np.ones(5) * 0.3)  # heavily skewed over the 5
    ids = used[rng.choice(5, size=(40, 8), p=p)].astype(np.int32)
    r = check_route(ids, e, w4.route(jnp.asarray(ids), e, implementation=implementation))
    empty = np.setdiff1d(np.arange(e), np.unique(ids))
    assert np.all(np.asarray(r.rows_per_expert)[empty] == 0)
    # Empty experts have zero-length segments: offsets[e] == offsets[e+1].
    offsets = np.asarray(r.group_offsets)
    assert np.all(offsets[empty] == offsets[empty + 1])


@pytest.mark.parametrize("implementation", EVERY_IMPLEMENTATION)
def test_dropped_slots_int32(rng, implementation):
    e = 16
    ids = rng.integers(0, e, size=(50, 8)).astype(np.int64)
    bad = np.array([-1, e, e + 1, -7, 2**31 - 1, -(2**31), 1000])
    mask = rng.random(ids.shape) < 0.3
    ids[mask] = rng.choice(bad, size=mask.sum())
    ids = ids.astype(np.int32)
    r = check_route(ids, e, w4.route(jnp.asarray(ids), e, implementation=implementation))
    assert np.all(np.asarray(r.positions)[mask] == -1)
    assert int(r.group_offsets[-1]) == (~mask).sum()


@pytest.mark.parametrize("implementation", EVERY_IMPLEMENTATION)
def test_all_slots_dropped(rng, implementation):
    e = 8
    ids = rng.choice([-1, e, 2**30], size=(4, 3)).astype(np.int32)
    r = check_route(ids, e, w4.route(jnp.asarray(ids), e, implementation=implementation))
    assert np.all(np.asarray(r.positions) == -1) and int(r.group_offsets[-1]) == 0


@pytest.mark.parametrize("implementation", EVERY_IMPLEMENTATION)
def test_expert_parallel_id_equals_e(rng, implementation):
    # Expert parallelism marks experts held elsewhere with id = E.
    e = 32
    ids = rng.integers(0, 2 * e, size=(20, 8))
    ids = np.where(ids >= e, e, ids).astype(np.int32)
    check_route(ids, e, w4.route(jnp.asarray(ids), e, implementation=implementation))


@pytest.mark.parametrize("implementation", EVERY_IMPLEMENTATION)
@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.uint32, np.int64, np.uint64])
def test_other_integer_dtypes(rng, implementation, dtype):
    e = 200
    hi = min(np.iinfo(dtype).max, 400)
    ids = rng.integers(0, hi, size=(9, 8)).astype(dtype)  # ids >= 200 are dropped
    check_route(ids, e, w4.route(ids, e, implementation=implementation))  # host array: the package converts it


@pytest.mark.parametrize("implementation", EVERY_IMPLEMENTATION)
def test_int64_host_ids_beyond_int32_are_dropped(rng, implementation):
    # Without x64, JAX narrows int64 to int32; ids like 2**32 + 3 must stay dropped, not wrap to 3.
    e = 8
    ids = rng.integers(0, e, size=(6, 4)).astype(np.int64)
    ids[0, 1] = 2**32 + 3
    ids[2, 0] = -(2**32) + 5
    ids[5, 3] = 2**40
    r = check_route(ids, e, w4.route(ids, e, implementation=implementation))
    assert r.positions[0, 1] == -1 and r.positions[2, 0] == -1 and r.positions[5, 3] == -1


def _enable_x64():
    if hasattr(jax, "enable_x64"):
        return jax.enable_x64(True)
    from jax.experimental import enable_x64  # older JAX spelling
    return enable_x64()


def test_int64_device_ids_with_x64(rng):
    e = 8
    ids = rng.integers(0, e, size=(6, 4)).astype(np.int64)
    ids[1, 2] = 2**32 + 1
    ids[4, 0] = -(2**33)
    with _enable_x64():
        dev = jnp.asarray(ids)
        assert dev.dtype == jnp.int64
        check_route(ids, e, w4.route(dev, e, implementation="reference"))
        check_route(ids, e, route_fn(e, "reference")(dev))


@pytest.mark.parametrize("implementation", EVERY_IMPLEMENTATION)
def test_route_under_jit(rng, implementation):
    e = DEEPSEEK_V3_TP4.experts
    ids = rng.integers(-1, e + 1, size=(33, 8)).astype(np.int32)
    check_route(ids, e, route_fn(e, implementation)(jnp.asarray(ids)))
    # "auto" resolves to the CUDA path with a GPU build, else to the reference path; both agree.
    check_route(ids, e, w4.route(jnp.asarray(ids), e))


# ---------------------------------------------------------------------------------------------
# CUDA path only: unaligned input, the clamp before the kernel, device-side sizes, bad input
# ---------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("m,k,e", [(7, 8, 8), (1000, 6, 256), (2000, 8, 1024)])
@pytest.mark.parametrize("offset", [1, 2, 3])
def test_route_misaligned_ids(rng, m, k, e, offset):
    """topk_ids as a slice at an odd element offset: the kernel's 16-byte loads need a scalar head."""
    ids = make_ids(rng, "dropped", m, k, e)
    big = np.concatenate([rng.integers(0, e, size=offset).astype(np.int32), ids.reshape(-1)])
    fn = jax.jit(lambda b: w4.route(b[offset:].reshape(m, k), e, implementation="cuda"))
    assert_same_routing(fn(jnp.asarray(big)), ids, e)


@pytest.mark.gpu
def test_route_narrow_dtype_ids(rng):
    """Non-int32 ids are clamped in Python before the kernel; out-of-range int8 values drop."""
    e = 8
    ids = rng.integers(-3, 12, size=(50, 8)).astype(np.int8)
    got = route_fn(e, "cuda")(jnp.asarray(ids))
    assert_same_routing(got, ids.astype(np.int32), e)


@pytest.mark.gpu
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


@pytest.mark.gpu
def test_route_bad_input_raises_before_launch():
    ids = jnp.zeros((4, 2), jnp.int32)
    with pytest.raises(TypeError, match="topk_ids"):
        w4.route(jnp.zeros((4, 2), jnp.float32), 8, implementation="cuda")
    with pytest.raises(ValueError, match="rank 2"):
        w4.route(jnp.zeros((8,), jnp.int32), 8, implementation="cuda")
    for bad in (0, -1, w4._backend.limits().max_experts + 1):
        with pytest.raises(ValueError, match="num_experts"):
            w4.route(ids, bad, implementation="cuda")
    with pytest.raises(TypeError, match="num_experts"):
        w4.route(ids, 8.0, implementation="cuda")
    # No slots (an idle rank's empty batch): an empty routing, no launch.
    empty = w4.route(jnp.zeros((0, 8), jnp.int32), 8, implementation="cuda")
    assert empty.positions.shape == (0, 8) and not np.asarray(empty.group_offsets).any()
