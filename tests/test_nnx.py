"""The Flax NNX DeepSeek-V3 MoE block against `moe` (skipped without flax: pip install ".[flax]")."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

nnx = pytest.importorskip("flax.nnx")

import w4afp8_jax as w4  # noqa: E402
from test_checkpoint import E, EXPERT, H, MOE_LAYERS, write_checkpoint  # noqa: E402
from w4afp8_jax.nnx import DeepseekV3MoE  # noqa: E402

ROUTER = {"top_k": 2, "n_group": 2, "topk_group": 1, "routed_scaling_factor": 2.5, "implementation": "reference"}
SHARED = 256
M = 5


def routed(tensors, layer, x):
    """The routed experts through `moe`, routed by hand with the checkpoint's router."""
    gate = tensors[f"model.layers.{layer}.mlp.gate.weight"].astype(np.float32)
    bias = tensors[f"model.layers.{layer}.mlp.gate.e_score_correction_bias"]
    logits = jnp.dot(jnp.asarray(x, jnp.float32), jnp.asarray(gate).T, precision=jax.lax.Precision.HIGHEST)
    tw, ids = w4.deepseek_topk(logits, jnp.asarray(bias), top_k=2, n_group=2, topk_group=1)
    t = lambda e, proj, what: tensors[EXPERT.format(layer, e, proj + "_proj") + "." + what]  # noqa: E731
    w13 = w4.W4Weights(np.stack([np.concatenate([t(e, "gate", "weight"), t(e, "up", "weight")]) for e in range(E)]),
                       np.stack([np.concatenate([t(e, "gate", "weight_scale_inv"), t(e, "up", "weight_scale_inv")])
                                 for e in range(E)]))
    w2 = w4.W4Weights(np.stack([t(e, "down", "weight") for e in range(E)]),
                      np.stack([t(e, "down", "weight_scale_inv") for e in range(E)]))
    a1 = max(float(tensors[EXPERT.format(layer, e, g) + ".input_scale"][0]) for e in range(E) for g in ("w1", "w3"))
    a2 = max(float(tensors[EXPERT.format(layer, e, "w2") + ".input_scale"][0]) for e in range(E))
    return w4.moe(x, ids, tw, w13, w2, a1_scale=a1, a2_scale=a2, routed_scaling_factor=2.5, implementation="reference")


def shared_expert(tensors, layer, x):
    """float64 shared expert with the block's roundings: bf16 x, weights and h."""
    def weight(proj):
        name = f"model.layers.{layer}.mlp.shared_experts.{proj}_proj.weight"
        w = tensors[name].astype(np.float64)
        s = np.repeat(np.repeat(tensors[name + "_scale_inv"], 128, 0), 128, 1)
        return (w * s).astype(ml_dtypes.bfloat16).astype(np.float64)
    xb = np.asarray(x, ml_dtypes.bfloat16).astype(np.float64)
    g, u = xb @ weight("gate").T, xb @ weight("up").T
    h = (g / (1 + np.exp(-g)) * u).astype(ml_dtypes.bfloat16).astype(np.float64)
    return h @ weight("down").T


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, module_rng):
    path = tmp_path_factory.mktemp("ckpt")
    return path, write_checkpoint(path, module_rng[1], shared_inter=SHARED)


def test_one_layer_block_equals_moe_plus_shared_expert(checkpoint, rng):
    path, tensors = checkpoint
    x = jnp.asarray(rng.standard_normal((M, H)), jnp.bfloat16)
    block = DeepseekV3MoE.from_checkpoint(path, layers=2, shared_experts=False, progress=False, **ROUTER)
    assert block.w13.get_value().packed.shape == (E, 512, H // 2)
    assert "DeepseekV3MoE" in repr(block)  # flax rebuilds W4Weights with placeholder leaves to print
    want = routed(tensors, 2, x)
    np.testing.assert_array_equal(np.asarray(block(x).astype(jnp.float32)), np.asarray(want.astype(jnp.float32)))

    block = DeepseekV3MoE.from_checkpoint(path, layers=2, progress=False, **ROUTER)
    got = np.asarray(block(x).astype(jnp.float32))
    shared = shared_expert(tensors, 2, x)
    full = np.asarray(want.astype(jnp.float32), np.float64) + shared
    assert np.linalg.norm(shared) > 0.3 * np.linalg.norm(full)  # the shared expert matters
    # bf16 roundings of the output (2^-9) and f32-vs-f64 sums before the bf16 h: 4e-3 normwise.
    assert np.linalg.norm(got - full) <= 4e-3 * np.linalg.norm(full)


def test_nnx_scan_over_stacked_layers_equals_a_loop(checkpoint, rng):
    path, _ = checkpoint
    x = jnp.asarray(rng.standard_normal((M, H)), jnp.bfloat16)
    stacked = DeepseekV3MoE.from_checkpoint(path, progress=False, **ROUTER)
    assert stacked.gate_weight[...].shape == (len(MOE_LAYERS), E, H)
    assert stacked.w13.get_value().packed.shape[0] == len(MOE_LAYERS)
    with pytest.raises(ValueError, match="layer=i"):  # a stack called as if it were one layer
        stacked(x)

    @nnx.jit
    def run(layers, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def step(x, layer):
            return (x.astype(jnp.float32) + layer(x).astype(jnp.float32)).astype(jnp.bfloat16)
        return step(x, layers)

    got = run(stacked, x)

    @nnx.jit
    def run_in_place(layers, x):  # layer views: the stack is indexed, not sliced
        def step(i, x):
            return (x.astype(jnp.float32) + layers(x, layer=i).astype(jnp.float32)).astype(jnp.bfloat16)
        return jax.lax.fori_loop(0, len(MOE_LAYERS), step, x)

    np.testing.assert_array_equal(np.asarray(run_in_place(stacked, x).astype(jnp.float32)),
                                  np.asarray(got.astype(jnp.float32)))
    want = x
    for layer in MOE_LAYERS:
        block = DeepseekV3MoE.from_checkpoint(path, layers=layer, progress=False, **ROUTER)
        want = nnx.jit(lambda b, x: (x.astype(jnp.float32) + b(x).astype(jnp.float32)).astype(jnp.bfloat16))(block, want)
    np.testing.assert_array_equal(np.asarray(got.astype(jnp.float32)), np.asarray(want.astype(jnp.float32)))


def test_sharded_experts(checkpoint, rng):
    path, _ = checkpoint
    devices = jax.devices("cpu")
    if len(devices) < 4:
        pytest.skip("needs 4 (simulated) CPU devices")
    mesh = jax.sharding.Mesh(np.array(devices[:4]), ("ep",))
    sharded = DeepseekV3MoE.from_checkpoint(path, layers=[1, 3], progress=False,
                                            sharding=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "ep")),
                                            **ROUTER)
    assert sharded.w13.get_value().packed.sharding.spec == jax.sharding.PartitionSpec(None, "ep")
    assert sharded.gate_weight[...].sharding.is_fully_replicated
    plain = DeepseekV3MoE.from_checkpoint(path, layers=[1, 3], progress=False, **ROUTER)
    x = jnp.asarray(rng.standard_normal((M, H)), jnp.bfloat16)

    @nnx.jit
    def run(layers, x):
        return nnx.scan(lambda x, layer: (x, layer(x)), in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0))(x, layers)[1]

    got, want = run(sharded, x), run(plain, x)
    # The partitioner may reorder f32 sums: a bf16 output may move by an ulp (2^-8 relative).
    np.testing.assert_allclose(np.asarray(got.astype(jnp.float32)), np.asarray(want.astype(jnp.float32)), rtol=2**-7,
                               atol=0)


def test_defaults_taken_from_nowhere_warn(tmp_path, rng):
    """A checkpoint without router bias, shared expert or router settings in config.json loads,
    but says which defaults it used."""
    write_checkpoint(tmp_path, rng, router_bias=False)
    with pytest.warns(UserWarning) as record:
        block = DeepseekV3MoE.from_checkpoint(tmp_path, layers=2, progress=False, implementation="reference")
    messages = " | ".join(str(w.message) for w in record)
    for expected in ("no num_experts_per_tok; using DeepSeek-V3's 8",
                     "no routed_scaling_factor; using DeepSeek-V3's 2.5", "the router bias is zero",
                     "no shared expert"):
        assert expected in messages
    assert not np.any(np.asarray(block.e_score_correction_bias[...]))
    # Settings given and the shared expert declined: only the missing bias is left to warn about.
    with pytest.warns(UserWarning) as record:
        DeepseekV3MoE.from_checkpoint(tmp_path, layers=2, shared_experts=False, progress=False, **ROUTER)
    assert [str(w.message).endswith("the router bias is zero") for w in record] == [True]


def test_block_runs_the_checkpoints_activation_scaling(rng, tmp_path):
    """A compressed-tensors W4AFP8 checkpoint declares dynamic per-token activation scales: the
    block from_checkpoint builds runs them (bitwise `moe` with activation_scaling="per_token" on
    the block's own router and weights); activation_scaling= overrides the declaration; a value
    other than the two raises, naming it."""
    from test_checkpoint_compressed_tensors import draw, write_ct

    write_ct(tmp_path, rng, draw(rng, layers=(1, 2)))
    x = jnp.asarray(rng.standard_normal((M, H)) * np.exp(rng.uniform(-3, 3, (M, 1))), jnp.bfloat16)
    outputs = {}
    for scaling in ("per_token", "per_tensor"):
        override = {} if scaling == "per_token" else {"activation_scaling": scaling}
        with pytest.warns(UserWarning, match="per-token"):  # load_moe_experts' note on the declaration
            block = DeepseekV3MoE.from_checkpoint(tmp_path, layers=2, shared_experts=False, progress=False,
                                                  **ROUTER, **override)
        assert block.activation_scaling == scaling
        logits = jnp.dot(jnp.asarray(x, jnp.float32), block.gate_weight[...].T, precision=jax.lax.Precision.HIGHEST)
        tw, ids = w4.deepseek_topk(logits, block.e_score_correction_bias[...], top_k=2, n_group=2, topk_group=1)
        want = w4.moe(x, ids, tw, block.w13.get_value(), block.w2.get_value(), activation_scaling=scaling,
                      routed_scaling_factor=2.5, implementation="reference")
        outputs[scaling] = np.asarray(block(x).astype(jnp.float32))
        np.testing.assert_array_equal(outputs[scaling], np.asarray(want.astype(jnp.float32)))
    assert not np.array_equal(outputs["per_token"], outputs["per_tensor"])
    with pytest.raises(ValueError, match="activation_scaling must be one of"):
        DeepseekV3MoE(block.gate_weight[...], None, block.w13.get_value(), block.w2.get_value(),
                      activation_scaling="per_row")
