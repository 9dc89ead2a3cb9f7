"""Expert parallelism on simulated CPU devices (conftest forces 8 host devices): the sharded
layer equals the single-device layer for 2, 4 and 8 shards, both dispatches, tokens sharded
or replicated, and for every weight form and placement `moe` takes
(parallel_checks.PLACEMENT_CASES).

Bound: each (token, slot) row goes through the same per-row math on its expert's shard; only
the reference GEMM's batching of rows changes (f32 summation order inside XLA's dot), so rare
bf16 flips in c1 can move an fp8 code of h; 5e-3 relative norm allows a few such flips and fails
on any misrouted row, expert, scale or slot (those are O(1) errors).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec

import w4afp8_jax as w4
from parallel_checks import PLACEMENT_CASES, assert_expert_parallel_close, check_every_placement

E, H, INTER, TOKENS, TOP_K = 16, 256, 128, 32, 4


@pytest.fixture(scope="module")
def layer_weights():
    rng = np.random.default_rng(7)

    def weights(n, k):
        packed = jnp.asarray(rng.integers(0, 256, size=(E, n, k // 2), dtype=np.uint8))
        scales = jnp.asarray((rng.standard_normal((E, n, k // 128)) * 0.005).astype(np.float32))
        return w4.W4Weights(packed, scales)

    return weights(2 * INTER, H), weights(H, INTER)


def make_routing(rng, kind, shards):
    if kind == "uniform":
        ids = np.stack([rng.choice(E, TOP_K, replace=False) for _ in range(TOKENS)])
    elif kind == "skewed":  # most slots on experts 0 and 1 (the first shard)
        ids = np.where(rng.random((TOKENS, TOP_K)) < 0.8, rng.integers(0, 2, (TOKENS, TOP_K)),
                       rng.integers(0, E, (TOKENS, TOP_K)))
    elif kind == "one_shard":  # every token to experts of the last shard
        per = E // shards
        ids = np.stack([rng.choice(np.arange(E - per, E), min(TOP_K, per), replace=False) for _ in range(TOKENS)])
        ids = np.pad(ids, ((0, 0), (0, TOP_K - ids.shape[1])), constant_values=E)  # pad with dropped slots
    else:  # dropped slots mixed in
        ids = rng.integers(0, E, size=(TOKENS, TOP_K))
        ids[rng.random(ids.shape) < 0.25] = E
    weights = rng.random((TOKENS, TOP_K)).astype(np.float32)
    return jnp.asarray(ids.astype(np.int32)), jnp.asarray(weights)


DISPATCHES = [("all_to_all", True), ("all_gather", True), ("all_gather", False)]  # (dispatch, token_sharded)
# Every shard count, routing kind, dispatch and scale kind, without the full product; per-token
# scales (each row's amax is local to the device holding the row) with every dispatch.
# The cases' scales: True static, False dynamic (the bool the cases had), or per-token.
SCALES = {True: dict(a1_scale=0.02, a2_scale=0.01), False: {}, "per_token": dict(activation_scaling="per_token")}
CASES = [(shards, kind, *DISPATCHES[(i + j) % 3], (i + j) % 2 == 0)
         for i, shards in enumerate([2, 4, 8]) for j, kind in enumerate(["uniform", "skewed", "one_shard", "dropped"])]
CASES += [(2, "dropped", "all_to_all", True, "per_token"), (4, "skewed", "all_gather", True, "per_token"),
          (2, "uniform", "all_gather", False, "per_token"), (8, "one_shard", "all_to_all", True, "per_token")]


@pytest.mark.parametrize("shards,kind,dispatch,token_sharded,scales", CASES)
def test_sharded_layer_equals_single_device(rng, layer_weights, shards, kind, dispatch, token_sharded, scales):
    if len(jax.devices("cpu")) < shards:
        pytest.skip(f"needs {shards} CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count)")
    w13, w2 = layer_weights
    ids, tw = make_routing(rng, kind, shards)
    x = jnp.asarray(rng.standard_normal((TOKENS, H)), jnp.bfloat16)
    if scales == "per_token":  # tokens of very different sizes: per-token scales differ
        x = x * jnp.exp(jnp.asarray(rng.uniform(-3, 3, (TOKENS, 1)), jnp.float32)).astype(jnp.bfloat16)
    scales = SCALES[scales]
    mesh = Mesh(np.array(jax.devices("cpu")[:shards]), ("ep",))
    sharded = jax.jit(lambda *a: w4.moe_expert_parallel(*a, mesh=mesh, dispatch=dispatch, token_sharded=token_sharded,
                                                        routed_scaling_factor=2.5, implementation="reference",
                                                        precision=jax.lax.Precision.HIGHEST, **scales))
    got = np.asarray(sharded(x, ids, tw, w13, w2).astype(jnp.float32))
    want = np.asarray(w4.moe(x, ids, tw, w13, w2, routed_scaling_factor=2.5, implementation="reference",
                             **scales).astype(jnp.float32))
    assert_expert_parallel_close(got, want)


@pytest.mark.parametrize("form,placement,tokens,scales", PLACEMENT_CASES)
def test_every_weight_form_and_placement(rng, form, placement, tokens, scales):
    """Every weight form and placement `moe` takes (parallel_checks.PLACEMENT_CASES: sets in both
    layouts and layer() views of a stack, on the host, uncommitted, committed to one device,
    sharded or replicated on the mesh), eagerly and under jit, equals the one-device layer."""
    layer = lambda *a, **kw: w4.moe_expert_parallel(*a, **kw, axis_name="ep", implementation="reference",
                                                    precision=jax.lax.Precision.HIGHEST)
    check_every_placement(rng, form, placement, tokens, scales, layer=layer, axis_name="ep", weight_axis=3,
                          token_spec=PartitionSpec("ep"), arrange=lambda w13, w2: (w13, w2),
                          check=lambda got, want, *_, **__: assert_expert_parallel_close(got, want))


@pytest.mark.parametrize("dispatch,token_sharded", DISPATCHES)
def test_expert_parallel_empty_batch(layer_weights, dispatch, token_sharded):
    mesh = Mesh(np.array(jax.devices("cpu")[:2]), ("ep",))
    out = w4.moe_expert_parallel(jnp.zeros((0, H), jnp.bfloat16), jnp.zeros((0, TOP_K), jnp.int32),
                                 jnp.zeros((0, TOP_K), jnp.float32), *layer_weights, mesh=mesh, dispatch=dispatch,
                                 token_sharded=token_sharded, implementation="reference")
    assert out.shape == (0, H) and out.dtype == jnp.bfloat16


def test_expert_parallel_rejects_uneven_splits(layer_weights):
    w13, w2 = layer_weights
    mesh = Mesh(np.array(jax.devices("cpu")[:1]), ("ep",))
    x = jnp.zeros((TOKENS, H), jnp.bfloat16)
    ids, tw = jnp.zeros((TOKENS, TOP_K), jnp.int32), jnp.ones((TOKENS, TOP_K), jnp.float32)
    with pytest.raises(ValueError, match="axis_name"):
        w4.moe_expert_parallel(x, ids, tw, w13, w2, mesh=mesh, axis_name="tp")
    if len(jax.devices("cpu")) >= 3:
        mesh3 = Mesh(np.array(jax.devices("cpu")[:3]), ("ep",))
        with pytest.raises(ValueError, match="x: 31 tokens"):
            w4.moe_expert_parallel(x[:31], ids[:31], tw[:31], w13, w2, mesh=mesh3)
        with pytest.raises(ValueError, match="w13: 16 experts"):
            w4.moe_expert_parallel(x[:30], ids[:30], tw[:30], w13, w2, mesh=mesh3)
    with pytest.raises(ValueError, match="dispatch"):
        w4.moe_expert_parallel(x, ids, tw, w13, w2, mesh=mesh, dispatch="ragged")
    with pytest.raises(ValueError, match="token_sharded"):
        w4.moe_expert_parallel(x, ids, tw, w13, w2, mesh=mesh, dispatch="all_to_all", token_sharded=False)
    with pytest.raises(ValueError, match="precision"):
        w4.moe_expert_parallel(x, ids, tw, w13, w2, mesh=mesh, precision="bogus")
    stack = jax.tree.map(lambda a: a[None], w13)  # [1, E, N, K/2]: a stack, not one layer
    with pytest.raises(ValueError, match=r"w13 must hold one layer's weights .* w13\.layer\(i\)"):
        w4.moe_expert_parallel(x, ids, tw, stack, w2, mesh=mesh)
