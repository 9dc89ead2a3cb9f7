"""route (step 1): rows per expert, exclusive offsets, stable expert-sorted positions.

Routing is integer bookkeeping, so every comparison with the NumPy model is exact."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import numpy_model as ref
import w4afp8_jax as w4


def check_route(ids, num_experts, routing=None):
    """Exact agreement with the model plus the invariants the later steps rely on."""
    if routing is None:
        routing = w4.route(ids, num_experts, implementation="reference")
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
    flat = [int(v) for v in np.asarray(ids).reshape(-1)]
    kept = pos >= 0
    assert np.array_equal(kept, [0 <= e < num_experts for e in flat])
    assert sorted(pos[kept].tolist()) == list(range(int(offsets[-1])))
    for i in np.nonzero(kept)[0]:
        assert offsets[flat[i]] <= pos[i] < offsets[flat[i] + 1]
    for e in set(flat):
        if 0 <= e < num_experts:
            mine = pos[[i for i, v in enumerate(flat) if v == e]]
            assert np.all(np.diff(mine) > 0)
    return routing


@pytest.mark.parametrize("m,k,e", [(1, 1, 1), (1, 8, 256), (3, 8, 256), (16, 8, 256), (64, 8, 256),
                                   (7, 6, 16), (100, 2, 1024), (5, 3, 2)])
def test_random_ids_match_model(rng, m, k, e):
    ids = rng.integers(0, e, size=(m, k)).astype(np.int32)
    check_route(jnp.asarray(ids), e)


@pytest.mark.parametrize("m,k", [(1, 8), (37, 8), (512, 4)])
def test_all_slots_one_expert(rng, m, k):
    e = 256
    hot = int(rng.integers(0, e))
    ids = np.full((m, k), hot, np.int32)
    r = check_route(jnp.asarray(ids), e)
    counts = np.asarray(r.rows_per_expert)
    assert counts[hot] == m * k and counts.sum() == m * k
    # Stable: the sorted order is the token-major slot order itself.
    np.testing.assert_array_equal(np.asarray(r.positions), np.arange(m * k).reshape(m, k))


def test_empty_experts_and_skew(rng):
    e = 64
    used = rng.choice(e, size=5, replace=False)  # 59 empty experts
    p = rng.dirichlet(np.ones(5) * 0.3)  # heavily skewed over the 5
    ids = used[rng.choice(5, size=(40, 8), p=p)].astype(np.int32)
    r = check_route(jnp.asarray(ids), e)
    empty = np.setdiff1d(np.arange(e), np.unique(ids))
    assert np.all(np.asarray(r.rows_per_expert)[empty] == 0)
    # Empty experts have zero-length segments: offsets[e] == offsets[e+1].
    offsets = np.asarray(r.group_offsets)
    assert np.all(offsets[empty] == offsets[empty + 1])


def test_dropped_slots_int32(rng):
    e = 16
    ids = rng.integers(0, e, size=(50, 8)).astype(np.int64)
    bad = np.array([-1, e, e + 1, -7, 2**31 - 1, -(2**31), 1000])
    mask = rng.random(ids.shape) < 0.3
    ids[mask] = rng.choice(bad, size=mask.sum())
    ids = ids.astype(np.int32)
    r = check_route(jnp.asarray(ids), e)
    assert np.all(np.asarray(r.positions)[mask] == -1)
    assert int(r.group_offsets[-1]) == (~mask).sum()


def test_all_slots_dropped(rng):
    e = 8
    ids = rng.choice([-1, e, 2**30], size=(4, 3)).astype(np.int32)
    r = check_route(jnp.asarray(ids), e)
    assert np.all(np.asarray(r.positions) == -1) and int(r.group_offsets[-1]) == 0


def test_expert_parallel_id_equals_e(rng):
    # Expert parallelism marks experts held elsewhere with id = E.
    e = 32
    ids = rng.integers(0, 2 * e, size=(20, 8))
    ids = np.where(ids >= e, e, ids).astype(np.int32)
    check_route(jnp.asarray(ids), e)


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.uint32, np.int64, np.uint64])
def test_other_integer_dtypes(rng, dtype):
    e = 200
    hi = min(np.iinfo(dtype).max, 400)
    ids = rng.integers(0, hi, size=(9, 8)).astype(dtype)  # ids >= 200 are dropped
    check_route(ids, e)  # host array: the package converts it


def test_int64_host_ids_beyond_int32_are_dropped(rng):
    # Without x64, JAX narrows int64 to int32; ids like 2**32 + 3 must stay dropped, not wrap to 3.
    e = 8
    ids = rng.integers(0, e, size=(6, 4)).astype(np.int64)
    ids[0, 1] = 2**32 + 3
    ids[2, 0] = -(2**32) + 5
    ids[5, 3] = 2**40
    r = check_route(ids, e)
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
        r = w4.route(dev, e, implementation="reference")
        check_route(ids, e, r)
        r_jit = jax.jit(lambda i: w4.route(i, e, implementation="reference"))(dev)
        check_route(ids, e, r_jit)


def test_route_under_jit(rng):
    e = 256
    ids = rng.integers(-1, e + 1, size=(33, 8)).astype(np.int32)
    r = jax.jit(lambda i: w4.route(i, e, implementation="reference"))(jnp.asarray(ids))
    check_route(ids, e, r)
    # "auto" resolves to the reference path on this machine and agrees too.
    check_route(ids, e, w4.route(jnp.asarray(ids), e))
