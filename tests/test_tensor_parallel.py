"""Tensor parallelism on simulated CPU devices (conftest forces 8 host devices): the weight
slices are the full weights' rows/columns (of layer() views and stacks too), and the layer
equals the one-device layer within the bound of its extra bf16 roundings for 2, 4 and 8
devices, and for every weight form and placement `moe` takes (parallel_checks.PLACEMENT_CASES).

Bound: parallel_checks.tensor_parallel_bound, per element, from the reference ops. The norm
of that bound bounds the norm of the error; on top, rare fp8 code flips of h (XLA's CPU dot
blocks the K sums differently for a narrower N, measured: ~3e-5 of c1 values flip one bf16
ulp at P = 8) get the 5e-3 relative norm allowance of test_expert_parallel.py, and 99% of
the elements must meet the per-element bound. A wrong slice, row order or scale gives O(1) errors.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import w4afp8_jax as w4
from helpers import int4_weights, routed_tokens
from parallel_checks import PLACEMENT_CASES, PLACEMENT_MESH, assert_tensor_parallel_close, check_every_placement

E, H, INTER, TOKENS, TOP_K = 16, 256, 1024, 32, 4
RSF = 2.5


def random_weights(rng, n, k, e=E):
    packed = jnp.asarray(rng.integers(0, 256, size=(e, n, k // 2), dtype=np.uint8))
    scales = jnp.asarray((rng.standard_normal((e, n, k // 128)) * 0.005).astype(np.float32))
    return w4.W4Weights(packed, scales)


@pytest.fixture(scope="module")
def layer_weights():
    rng = np.random.default_rng(11)
    return random_weights(rng, 2 * INTER, H), random_weights(rng, H, INTER)


def make_routing(rng, kind):
    if kind == "uniform":
        ids = np.stack([rng.choice(E, TOP_K, replace=False) for _ in range(TOKENS)])
    elif kind == "skewed":  # most slots on experts 0 and 1
        ids = np.where(rng.random((TOKENS, TOP_K)) < 0.8, rng.integers(0, 2, (TOKENS, TOP_K)),
                       rng.integers(0, E, (TOKENS, TOP_K)))
    else:  # dropped slots mixed in
        ids = rng.integers(0, E, size=(TOKENS, TOP_K))
        ids[rng.random(ids.shape) < 0.25] = E
    weights = rng.random((TOKENS, TOP_K)).astype(np.float32)
    return jnp.asarray(ids.astype(np.int32)), jnp.asarray(weights)


def mesh_of(size):
    if len(jax.devices("cpu")) < size:
        pytest.skip(f"needs {size} CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count)")
    return Mesh(np.array(jax.devices("cpu")[:size]), ("tp",))


@pytest.mark.parametrize("size", [1, 2, 4, 8])
@pytest.mark.parametrize("layout", ["checkpoint", "tiled"])
def test_slices_are_the_full_weights_rows_and_columns(size, layout):
    rng = np.random.default_rng(size)
    w13, w2 = random_weights(rng, 2 * INTER, H, e=2), random_weights(rng, H, INTER, e=2)
    if layout == "tiled":
        w13, w2 = w13.prepare(), w2.prepare()
    full13, full2 = np.asarray(w13.dequantize()), np.asarray(w2.dequantize())
    part = INTER // size
    w13_tp, w2_tp = w4.shard_tensor_parallel(w13, w2, size)
    assert (w13_tp.layout, w2_tp.layout) == (layout, layout)
    assert w13_tp.packed.shape == w13.packed.shape and w2_tp.packed.shape == (2, size * H, part // 2)
    arranged13, arranged2 = np.asarray(w13_tp.dequantize()), np.asarray(w2_tp.dequantize())
    for rank in range(size):
        lo, hi = rank * part, (rank + 1) * part
        s13, s2 = w4.tensor_parallel_slice(w13, w2, rank, size)
        want13 = np.concatenate([full13[:, lo:hi], full13[:, INTER + lo:INTER + hi]], axis=1)
        np.testing.assert_array_equal(np.asarray(s13.dequantize()), want13)
        np.testing.assert_array_equal(np.asarray(s2.dequantize()), full2[:, :, lo:hi])
        np.testing.assert_array_equal(arranged13[:, 2 * lo:2 * hi], want13)
        np.testing.assert_array_equal(arranged2[:, rank * H:(rank + 1) * H], full2[:, :, lo:hi])


def assert_same_weights(got, want):
    assert (got.layout, got.group_size, got.index) == (want.layout, want.group_size, None)
    np.testing.assert_array_equal(np.asarray(got.packed), np.asarray(want.packed))
    np.testing.assert_array_equal(np.asarray(got.scales), np.asarray(want.scales))


@pytest.mark.parametrize("layout", ["checkpoint", "tiled"])
def test_slices_of_layer_views_and_stacks(rng, layout):
    """tensor_parallel_slice and shard_tensor_parallel of layer(i) views are those of the layer
    the view names (a concrete index keeps a host stack on the host; a traced one, under jit,
    too), and of a stack [L, E, N, K/2] those of every layer, stacked along L."""
    size, layers = 2, 3
    sets = [(w4.W4Weights(*int4_weights(rng, 2, 2 * INTER, H)), w4.W4Weights(*int4_weights(rng, 2, H, INTER)))
            for _ in range(layers)]
    if layout == "tiled":
        sets = [(w13.prepare(), w2.prepare()) for w13, w2 in sets]
    stack = lambda ws: w4.W4Weights(np.stack([w.packed for w in ws]), np.stack([w.scales for w in ws]), 128, layout)
    w13s, w2s = stack([p[0] for p in sets]), stack([p[1] for p in sets])
    traced = jax.jit(lambda a, b, i: w4.shard_tensor_parallel(a.layer(i), b.layer(i), size))
    stacked = [w4.tensor_parallel_slice(w13s, w2s, r, size) for r in range(size)] + [
        w4.shard_tensor_parallel(w13s, w2s, size)]
    for i in range(layers):
        want = [w4.tensor_parallel_slice(*sets[i], r, size) for r in range(size)] + [
            w4.shard_tensor_parallel(*sets[i], size)]
        views = [w4.tensor_parallel_slice(w13s.layer(i), w2s.layer(i), r, size) for r in range(size)] + [
            w4.shard_tensor_parallel(w13s.layer(i), w2s.layer(i), size)]
        for got_views, got_stacked, pair in zip(views, stacked, want):
            for view, whole, w in zip(got_views, got_stacked, pair):
                assert isinstance(view.packed, np.ndarray) and isinstance(view.scales, np.ndarray)
                assert_same_weights(view, w)
                assert_same_weights(jax.tree.map(lambda a: a[i], whole), w)
        for got, w in zip(traced(w13s, w2s, i), want[-1]):
            assert_same_weights(got, w)


def test_stacks_need_a_layer(rng):
    """A stack [L, E, N, K/2] is not one layer: the layers say which argument and to take
    .layer(i); shard_tensor_parallel says when w13 and w2 have different leading axes."""
    mesh = mesh_of(2)
    w13, w2 = w4.W4Weights(*int4_weights(rng, 2, 2 * INTER, H)), w4.W4Weights(*int4_weights(rng, 2, H, INTER))
    as_stack = lambda w: w4.W4Weights(w.packed[None], w.scales[None])
    with pytest.raises(ValueError, match="w13 and w2 must have the same leading"):
        w4.shard_tensor_parallel(as_stack(w13), w2, 2)
    w13_tp, w2_tp = w4.shard_tensor_parallel(as_stack(w13), as_stack(w2), 2)
    x, ids, tw = (jnp.asarray(a) for a in routed_tokens(rng, TOKENS, H, 2, 1))
    with pytest.raises(ValueError, match=r"w13 must hold one layer's weights .* w13\.layer\(i\)"):
        w4.moe_tensor_parallel(x, ids, tw, w13_tp, w2_tp, mesh=mesh, implementation="reference")
    with pytest.raises(ValueError, match=r"w2 must hold one layer's weights .* w2\.layer\(i\)"):
        w4.moe_tensor_parallel(x, ids, tw, w13_tp.layer(0), w2_tp, mesh=mesh, implementation="reference")


def test_host_weights_stay_on_the_host(layer_weights):
    w13, w2 = (w4.W4Weights(np.asarray(w.packed), np.asarray(w.scales)) for w in layer_weights)
    w13_tp, w2_tp = w4.shard_tensor_parallel(w13, w2, 2)
    if isinstance(w13.packed, np.ndarray):  # W4Weights keeps numpy arrays as they are
        assert all(isinstance(a, np.ndarray) for a in (w13_tp.packed, w13_tp.scales, w2_tp.packed, w2_tp.scales))
    np.testing.assert_array_equal(np.asarray(w2_tp.dequantize())[:, H:],
                                  np.asarray(w2.dequantize())[:, :, INTER // 2:])


# Every size, routing and scale kind, both token placements (skewed: sharded), without the full product.
# Per-token scales: a token's needs nothing from the other devices, a (token, slot) row of h is
# split by columns over them (its scale: the max over the devices of the row's amax).
SCALES = {"static": dict(a1_scale=0.02, a2_scale=0.01), "dynamic": {},
          "per_token": dict(activation_scaling="per_token")}
SCALE_IDS = {"static": "True", "dynamic": "False", "per_token": "per_token"}  # the ids (seeds) of a former bool
LAYER_CASES = [pytest.param(size, kind, scales, id=f"{size}-{kind}-{SCALE_IDS[scales]}")
               for size, kind, scales in [
                   (2, "uniform", "static"), (2, "skewed", "dynamic"), (2, "dropped", "dynamic"),
                   (4, "uniform", "dynamic"), (4, "skewed", "static"), (8, "dropped", "static"), (8, "skewed", "dynamic"),
                   (2, "uniform", "per_token"), (4, "skewed", "per_token"), (8, "dropped", "per_token")]]


@pytest.mark.parametrize("size,kind,scales", LAYER_CASES)
def test_tensor_parallel_layer_equals_single_device(rng, layer_weights, size, kind, scales):
    mesh = mesh_of(size)
    w13, w2 = layer_weights
    ids, tw = make_routing(rng, kind)
    x = jnp.asarray(rng.standard_normal((TOKENS, H)), jnp.bfloat16)
    if scales == "per_token":  # tokens of very different sizes: per-token scales differ
        x = x * jnp.exp(jnp.asarray(rng.uniform(-3, 3, (TOKENS, 1)), jnp.float32)).astype(jnp.bfloat16)
    scales = SCALES[scales]
    token_sharded = kind == "skewed"  # both input placements, without doubling the cases
    w13_tp, w2_tp = w4.shard_tensor_parallel(w13, w2, size)
    placed = NamedSharding(mesh, PartitionSpec(None, "tp"))
    w13_tp, w2_tp = jax.device_put((w13_tp, w2_tp), placed)
    layer = jax.jit(lambda *a: w4.moe_tensor_parallel(*a, mesh=mesh, token_sharded=token_sharded,
                                                      routed_scaling_factor=RSF, implementation="reference",
                                                      precision=jax.lax.Precision.HIGHEST, **scales))
    got = np.asarray(layer(x, ids, tw, w13_tp, w2_tp).astype(jnp.float32))
    want = np.asarray(w4.moe(x, ids, tw, w13, w2, routed_scaling_factor=RSF, implementation="reference",
                             **scales).astype(jnp.float32))
    assert_tensor_parallel_close(got, want, x, ids, tw, w13, w2, size, routed_scaling_factor=RSF,
                                 implementation="reference", **scales)


@pytest.mark.parametrize("form,placement,tokens,scales", PLACEMENT_CASES)
def test_every_weight_form_and_placement(rng, form, placement, tokens, scales):
    """Every weight form and placement `moe` takes (parallel_checks.PLACEMENT_CASES: sets in both
    layouts and layer() views of a stack, arranged by shard_tensor_parallel, on the host,
    uncommitted, committed to one device, sharded or replicated on the mesh), eagerly and under
    jit, equals the one-device layer within the rounding bound."""
    layer = lambda *a, **kw: w4.moe_tensor_parallel(*a, **kw, axis_name="tp", implementation="reference",
                                                    precision=jax.lax.Precision.HIGHEST)
    check = lambda got, want, *a, **kw: assert_tensor_parallel_close(got, want, *a, PLACEMENT_MESH,
                                                                     implementation="reference", **kw)
    check_every_placement(rng, form, placement, tokens, scales, layer=layer, axis_name="tp", weight_axis=2,
                          token_spec=PartitionSpec(), check=check,
                          arrange=lambda w13, w2: w4.shard_tensor_parallel(w13, w2, PLACEMENT_MESH))


@pytest.mark.parametrize("token_sharded", [False, True])
def test_tensor_parallel_empty_batch(layer_weights, token_sharded):
    mesh = mesh_of(2)
    w13_tp, w2_tp = w4.shard_tensor_parallel(*layer_weights, 2)
    out = w4.moe_tensor_parallel(jnp.zeros((0, H), jnp.bfloat16), jnp.zeros((0, TOP_K), jnp.int32),
                                 jnp.zeros((0, TOP_K), jnp.float32), w13_tp, w2_tp, mesh=mesh,
                                 token_sharded=token_sharded, implementation="reference")
    assert out.shape == (0, H) and out.dtype == jnp.bfloat16


def test_tensor_parallel_rejects_bad_arguments(layer_weights):
    w13, w2 = layer_weights
    mesh = mesh_of(2)
    x = jnp.ones((TOKENS, H), jnp.bfloat16)
    ids, tw = jnp.zeros((TOKENS, TOP_K), jnp.int32), jnp.ones((TOKENS, TOP_K), jnp.float32)
    w13_tp, w2_tp = w4.shard_tensor_parallel(w13, w2, 2)
    call = lambda *a, **kw: w4.moe_tensor_parallel(*a, mesh=mesh, implementation="reference", **kw)
    with pytest.raises(ValueError, match="shard_tensor_parallel"):
        call(x, ids, tw, w13, w2)  # full weights, not arranged for 2 devices
    with pytest.raises(ValueError, match="axis_name"):
        call(x, ids, tw, w13_tp, w2_tp, axis_name="ep")
    with pytest.raises(ValueError, match="x: 31 tokens"):
        call(x[:31], ids[:31], tw[:31], w13_tp, w2_tp, token_sharded=True)
    with pytest.raises(ValueError, match="precision"):
        call(x, ids, tw, w13_tp, w2_tp, precision="bogus")
    with pytest.raises(ValueError, match="a1_scale"):
        call(x, ids, tw, w13_tp, w2_tp, a1_scale=-1.0)
    with pytest.raises(ValueError, match="topk_ids"):
        call(x, ids[:5], tw[:5], w13_tp, w2_tp)
    with pytest.raises(ValueError, match="x must have rank 2"):
        call(x[0], ids, tw, w13_tp, w2_tp)
    with pytest.raises(ValueError, match="group_size"):
        w4.shard_tensor_parallel(w13, w2, 16)  # I/16 = 64 columns: half a scale group
    with pytest.raises(ValueError, match="rank"):
        w4.tensor_parallel_slice(w13, w2, 2, 2)
    with pytest.raises(TypeError, match="mesh"):
        w4.moe_tensor_parallel(x, ids, tw, w13_tp, w2_tp, mesh=None)
