"""load_moe_experts on checkpoints written here in the real W4AFP8 layout (safetensors' own writer)."""

import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from safetensors import safe_open
from safetensors.numpy import save_file

import w4afp8_jax as w4
from w4afp8_jax.checkpoint import SafetensorsFile

H, INTER, E, MOE_LAYERS = 256, 256, 4, (1, 2, 3)
EXPERT = "model.layers.{}.mlp.experts.{}.{}"


def write_checkpoint(path, rng, *, layers=MOE_LAYERS, experts=E, hidden=H, inter=INTER, act_scales=True,
                     up_first=False, shared_inter=None, router_bias=True, input_scales=None):
    """A tiny DeepSeek-V3-style W4AFP8 checkpoint: a dense layer 0 (FP8 with block scales), routed
    experts in layers `layers` spread over two shards (layer by layer), act_scales.safetensors,
    the index and hf_quant_config.json; with shared_inter, an FP8 block-scaled shared expert of
    that intermediate size per MoE layer. input_scales: (w1/w3, w2) input scales of each expert,
    the same in every layer (None: random ones). Returns the tensors written, by name."""
    path.mkdir(parents=True, exist_ok=True)
    shards = [{}, {}]
    shards[0]["model.embed_tokens.weight"] = rng.standard_normal((32, hidden)).astype(ml_dtypes.bfloat16)
    shards[0]["model.layers.0.mlp.down_proj.weight"] = rng.standard_normal((hidden, 128)).astype(ml_dtypes.float8_e4m3fn)
    shards[0]["model.layers.0.mlp.down_proj.weight_scale_inv"] = rng.random((hidden // 128, 1), dtype=np.float32)
    scales = {}
    for i, layer in enumerate(layers):
        shard = shards[i % 2]
        shard[f"model.layers.{layer}.mlp.gate.weight"] = rng.standard_normal((experts, hidden)).astype(ml_dtypes.bfloat16)
        if router_bias:
            shard[f"model.layers.{layer}.mlp.gate.e_score_correction_bias"] = rng.random(experts, dtype=np.float32)
        for proj, n, k in (("gate", shared_inter, hidden), ("up", shared_inter, hidden), ("down", hidden, shared_inter)):
            if shared_inter:
                name = f"model.layers.{layer}.mlp.shared_experts.{proj}_proj.weight"
                shard[name] = rng.standard_normal((n, k)).astype(ml_dtypes.float8_e4m3fn)
                shard[name + "_scale_inv"] = (rng.random((n // 128, k // 128)) * 0.1 + 0.1).astype(np.float32)
        for e in range(experts):
            projs = [("gate", inter, hidden), ("up", inter, hidden), ("down", hidden, inter)]
            if up_first:
                projs[0], projs[1] = projs[1], projs[0]
            for proj, n, k in projs:
                name = EXPERT.format(layer, e, proj + "_proj")
                shard[name + ".weight"] = rng.integers(-128, 128, size=(n, k // 2), dtype=np.int8)
                shard[name + ".weight_scale_inv"] = (rng.random((n, k // 128)) * 0.01 + 1e-4).astype(np.float32)
            a13, a2 = (rng.random() * 0.01 + 1e-3, rng.random() * 0.02 + 1e-3) if input_scales is None else \
                input_scales[e]
            for gemm, v in (("w1", a13), ("w3", a13), ("w2", a2)):
                scales[EXPERT.format(layer, e, gemm) + ".input_scale"] = np.asarray([v], np.float32)
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-0000{i + 1}-of-00002.safetensors"
        save_file(shard, path / name)
        weight_map.update(dict.fromkeys(shard, name))
    if act_scales:
        save_file(scales, path / "act_scales.safetensors")
        weight_map.update(dict.fromkeys(scales, "act_scales.safetensors"))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (path / "hf_quant_config.json").write_text(json.dumps({"quantization": {"quant_algo": "MIXED_PRECISION"}}))
    (path / "config.json").write_text(json.dumps({"n_routed_experts": experts, "first_k_dense_replace": 1,
                                                  "num_hidden_layers": 1 + len(layers)}))
    tensors = {k: v for shard in shards for k, v in shard.items()}
    tensors.update(scales)
    return tensors


def expected(tensors, layers, experts, tp_size=1, tp_rank=0, inter=INTER):
    """The loader's result assembled by hand from the tensors written (numpy slicing); the
    activation scales are the max over all of a layer's experts, whichever are loaded."""
    local = inter // tp_size
    rows = slice(tp_rank * local, (tp_rank + 1) * local)

    def t(layer, e, proj, what):
        return tensors[EXPERT.format(layer, e, proj + "_proj") + "." + what]

    p13 = np.stack([np.stack([np.concatenate([t(l, e, "gate", "weight")[rows], t(l, e, "up", "weight")[rows]])
                              for e in experts]) for l in layers]).view(np.uint8)
    s13 = np.stack([np.stack([np.concatenate([t(l, e, "gate", "weight_scale_inv")[rows],
                                              t(l, e, "up", "weight_scale_inv")[rows]]) for e in experts]) for l in layers])
    p2 = np.stack([np.stack([t(l, e, "down", "weight")[:, tp_rank * local // 2:(tp_rank + 1) * local // 2]
                             for e in experts]) for l in layers]).view(np.uint8)
    s2 = np.stack([np.stack([t(l, e, "down", "weight_scale_inv")[:, tp_rank * local // 128:(tp_rank + 1) * local // 128]
                             for e in experts]) for l in layers])

    def act(layer, gemm):
        prefix, suffix = f"model.layers.{layer}.mlp.experts.", f".{gemm}.input_scale"
        return [float(v[0]) for k, v in tensors.items() if k.startswith(prefix) and k.endswith(suffix)]

    a1 = np.asarray([max(act(l, "w1") + act(l, "w3")) for l in layers], np.float32)
    a2 = np.asarray([max(act(l, "w2")) for l in layers], np.float32)
    return p13, s13, p2, s2, a1, a2


def assert_loaded(got, want):
    p13, s13, p2, s2, a1, a2 = want
    np.testing.assert_array_equal(np.asarray(got.w13.checkpoint_packed()), p13)
    np.testing.assert_array_equal(np.asarray(got.w13.scales), s13)
    np.testing.assert_array_equal(np.asarray(got.w2.checkpoint_packed()), p2)
    np.testing.assert_array_equal(np.asarray(got.w2.scales), s2)
    np.testing.assert_array_equal(np.asarray(got.a1_scale), a1)
    np.testing.assert_array_equal(np.asarray(got.a2_scale), a2)


@pytest.mark.parametrize("layout", ["tiled", "checkpoint"])
def test_load_all_moe_layers_bit_for_bit(rng, tmp_path, layout):
    tensors = write_checkpoint(tmp_path, rng)
    got = w4.load_moe_experts(tmp_path, layout=layout, progress=False)
    assert got.layers == MOE_LAYERS  # layer 0 is dense: no expert tensors
    assert got.w13.layout == got.w2.layout == layout
    assert got.w13.packed.shape == (3, E, 2 * INTER, H // 2) and got.w2.packed.shape == (3, E, H, INTER // 2)
    assert_loaded(got, expected(tensors, MOE_LAYERS, range(E)))
    if layout == "tiled":
        np.testing.assert_array_equal(np.asarray(got.w13.packed),
                                      np.asarray(w4.W4Weights(*expected(tensors, MOE_LAYERS, range(E))[:2]).prepare().packed))


def test_gate_and_up_are_found_by_name(rng, tmp_path):
    tensors = write_checkpoint(tmp_path, rng, up_first=True)  # up written before gate in the files
    got = w4.load_moe_experts(tmp_path, layers=[2], progress=False)
    assert_loaded(got, expected(tensors, [2], range(E)))


@pytest.mark.parametrize("tp_size", [1, 2])
def test_tensor_and_expert_parallel_slices(rng, tmp_path, tp_size):
    tensors = write_checkpoint(tmp_path, rng)
    for tp_rank in range(tp_size):
        for experts in ([3, 1], [0, 1, 2, 3]):
            got = w4.load_moe_experts(tmp_path, layers=[3, 1], tp_size=tp_size, tp_rank=tp_rank, expert_ids=experts,
                                      progress=False)
            assert got.layers == (3, 1)
            assert_loaded(got, expected(tensors, [3, 1], experts, tp_size, tp_rank))


def test_sharded_placement_reads_each_devices_block(rng, tmp_path):
    tensors = write_checkpoint(tmp_path, rng)
    devices = jax.devices("cpu")
    if len(devices) < 4:
        pytest.skip("needs 4 (simulated) CPU devices")
    mesh = Mesh(np.array(devices[:4]).reshape(2, 2), ("ep", "rows"))
    # Experts over "ep", the N axis over "rows" (whole 16-row tiles, so tiled packing works).
    got = w4.load_moe_experts(tmp_path, sharding=NamedSharding(mesh, P(None, "ep", "rows")), progress=False)
    assert got.w13.packed.sharding.spec == P(None, "ep", "rows")
    assert got.a1_scale.sharding.is_fully_replicated
    assert_loaded(got, expected(tensors, MOE_LAYERS, range(E)))

    def by_name(name, shape):
        return NamedSharding(mesh, P("ep") if len(shape) == 4 else P())

    got = w4.load_moe_experts(tmp_path, layers=[1, 2], sharding=by_name, layout="checkpoint", progress=False)
    assert got.w2.scales.sharding.spec == P("ep")
    assert_loaded(got, expected(tensors, [1, 2], range(E)))
    with pytest.raises(ValueError, match="whole 16-row tiles and every column"):
        w4.load_moe_experts(tmp_path, sharding=NamedSharding(mesh, P(None, None, None, "rows")), progress=False)


# The issue's layer: per-expert w1/w3 input scales 0.005 .. 0.04 and w2's 0.002 .. 0.016, so
# experts [0, 1] alone have a max of 0.01 / 0.004 where the layer's is 0.04 / 0.016.
ISSUE_SCALES = [(0.005, 0.002), (0.01, 0.004), (0.02, 0.008), (0.04, 0.016)]


def test_activation_scales_do_not_depend_on_the_split(rng, tmp_path):
    """Every expert subset (in any order), tensor-parallel rank and sharding loads the full
    load's per-layer scales: the max over all of the layer's experts."""
    write_checkpoint(tmp_path, rng, input_scales=ISSUE_SCALES)
    full = w4.load_moe_experts(tmp_path, progress=False)
    np.testing.assert_array_equal(np.asarray(full.a1_scale), np.float32([0.04] * len(MOE_LAYERS)))
    np.testing.assert_array_equal(np.asarray(full.a2_scale), np.float32([0.016] * len(MOE_LAYERS)))
    loads = {f"expert_ids={ids}": dict(expert_ids=ids) for ids in ([0, 1], [2, 3], [1], [3, 0])}
    loads.update({f"tp_rank={r}": dict(tp_size=2, tp_rank=r) for r in range(2)})
    loads["tp_rank=1, expert_ids=[0]"] = dict(tp_size=2, tp_rank=1, expert_ids=[0])
    devices = jax.devices("cpu")[:2]
    if len(devices) == 2:
        mesh = Mesh(np.array(devices), ("ep",))
        loads["sharding=P(None, 'ep')"] = dict(sharding=NamedSharding(mesh, P(None, "ep")))
        loads["sharding=P(None, 'ep'), expert_ids=[0, 1]"] = dict(sharding=NamedSharding(mesh, P(None, "ep")),
                                                                  expert_ids=[0, 1])
        loads["sharding=callable, expert_ids=[1]"] = dict(sharding=lambda name, shape: NamedSharding(mesh, P()),
                                                          expert_ids=[1])
    for what, kwargs in loads.items():
        got = w4.load_moe_experts(tmp_path, progress=False, **kwargs)
        for name in ("a1_scale", "a2_scale"):
            np.testing.assert_array_equal(np.asarray(getattr(got, name)), np.asarray(getattr(full, name)),
                                          err_msg=f"{name} of the load with {what}")


def test_expert_parallel_ranks_sum_to_the_one_device_layer(rng, tmp_path):
    """Two expert-parallel ranks (experts [0, 1] and [2, 3], each loaded on its own) run the
    reference layer on their own experts (the other slots dropped); the f32 sum of their bf16
    outputs r0 + r1 is the one-device layer's output y.

    Bound: each (token, slot) row goes through the same f32 math on its rank, with the same
    static scales, so only the bf16 roundings of r0, r1 and y differ (unit roundoff 2^-8 each):
    |r0 + r1 - y| <= 2^-8 (|r0| + |r1| + |y|) element-wise, hence normwise too (triangle
    inequality), about 9.4e-3 of ||y|| here (measured: about 2e-3, and no element past its
    element-wise bound). The normwise form leaves room for a few fp8 code flips of h should the
    reference GEMM's f32 summation order ever depend on the row batch. With each rank's own
    max scales the first rank saturates every |x| > 448 * 0.01 = 4.48 that the one-device layer
    keeps: 0.38 relative error."""
    write_checkpoint(tmp_path, rng, input_scales=ISSUE_SCALES)
    tokens, top_k = 32, 2
    x = jnp.asarray(rng.standard_normal((tokens, H)) * 4, jnp.bfloat16)  # many |x| > 4.48
    ids = np.stack([rng.choice(E, top_k, replace=False) for _ in range(tokens)]).astype(np.int32)
    tw = rng.random((tokens, top_k)).astype(np.float32)

    def layer(experts, ids, i):
        return w4.moe(x, jnp.asarray(ids), tw, experts.w13.layer(i), experts.w2.layer(i),
                      a1_scale=experts.a1_scale[i], a2_scale=experts.a2_scale[i], routed_scaling_factor=2.5,
                      implementation="reference").astype(jnp.float32)

    full = w4.load_moe_experts(tmp_path, progress=False)
    ranks = [(w4.load_moe_experts(tmp_path, expert_ids=list(own), progress=False), own) for own in ([0, 1], [2, 3])]
    for i in range(len(MOE_LAYERS)):
        want = np.asarray(layer(full, ids, i))
        # a rank's local expert ids; slots on the other rank's experts are dropped (id = 2)
        parts = [np.asarray(layer(experts, np.where(np.isin(ids, own), ids - own[0], len(own)), i))
                 for experts, own in ranks]
        assert np.linalg.norm(want) > 0 and all(np.linalg.norm(p) > 0 for p in parts)
        err = np.linalg.norm(sum(parts) - want)
        bound = 2.0**-8 * (sum(np.linalg.norm(p) for p in parts) + np.linalg.norm(want))
        assert err <= bound, f"layer {MOE_LAYERS[i]}: the ranks' sum is {err:.3g} off (normwise), bound {bound:.3g}"


def test_expert_subset_needs_every_experts_input_scale(rng, tmp_path):
    """A checkpoint holding the input scales of only the loaded experts cannot give the layer's
    scales: a KeyError names the first missing one, not a smaller max."""
    tensors = write_checkpoint(tmp_path, rng)
    save_file({k: v for k, v in tensors.items() if k.endswith("input_scale") and ".experts.2." not in k
               and ".experts.3." not in k}, tmp_path / "act_scales.safetensors")
    with pytest.raises(KeyError, match=r"layers\.1\.mlp\.experts\.2\.w1\.input_scale not found.*all of its 4 experts"):
        w4.load_moe_experts(tmp_path, expert_ids=[0, 1], progress=False)


def test_loaded_layers_scan_through_moe(rng, tmp_path):
    tensors = write_checkpoint(tmp_path, rng)
    experts = w4.load_moe_experts(tmp_path, progress=False)
    x = jnp.asarray(rng.standard_normal((3, H)), jnp.bfloat16)
    ids = jnp.asarray([[0, 1], [2, 3], [1, 3]], jnp.int32)
    tw = jnp.full((3, 2), 0.5, jnp.float32)

    def layer(x, e):
        return w4.moe(x, ids, tw, e.w13, e.w2, a1_scale=e.a1_scale, a2_scale=e.a2_scale, implementation="reference")

    got = jax.jit(lambda x, ex: jax.lax.scan(lambda c, e: (c, layer(x, e)), x, ex)[1])(x, experts)
    p13, s13, p2, s2, a1, a2 = expected(tensors, MOE_LAYERS, range(E))
    for i in range(len(MOE_LAYERS)):
        want = w4.moe(x, ids, tw, w4.W4Weights(p13[i], s13[i]), w4.W4Weights(p2[i], s2[i]), a1_scale=a1[i],
                      a2_scale=a2[i], implementation="reference")
        np.testing.assert_array_equal(np.asarray(got[i].astype(jnp.float32)), np.asarray(want.astype(jnp.float32)))


def test_missing_act_scales_mean_dynamic_scales(rng, tmp_path):
    write_checkpoint(tmp_path, rng, act_scales=False)
    got = w4.load_moe_experts(tmp_path, progress=False)
    assert got.a1_scale is None and got.a2_scale is None


def test_errors_name_the_tensor(rng, tmp_path):
    tensors = write_checkpoint(tmp_path, rng)
    with pytest.raises(KeyError, match=r"model\.layers\.5\.mlp\.experts\.0\.gate_proj\.weight not found"):
        w4.load_moe_experts(tmp_path, layers=[5], progress=False)
    with pytest.raises(ValueError, match=r"expert_ids: 4 is outside \[0, 4\)"):
        w4.load_moe_experts(tmp_path, expert_ids=[4], progress=False)
    with pytest.raises(ValueError, match="multiples of 128"):
        w4.load_moe_experts(tmp_path, tp_size=4, progress=False)

    # One mis-shaped scale and one float weight, rewritten into the shard that holds them.
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    bad_scale = EXPERT.format(2, 3, "down_proj") + ".weight_scale_inv"
    shard = index[bad_scale]
    content = {k: v for k, v in tensors.items() if index.get(k) == shard}
    save_file({**content, bad_scale: np.ones((H, 3), np.float32)}, tmp_path / shard)
    with pytest.raises(ValueError, match=rf"{bad_scale.replace('.', '[.]')}: expected shape \[{H}, 2\], got \[{H}, 3\]"):
        w4.load_moe_experts(tmp_path, progress=False)
    fp8_weight = EXPERT.format(2, 3, "down_proj") + ".weight"
    save_file({**content, fp8_weight: np.ones((H, INTER), ml_dtypes.float8_e4m3fn)}, tmp_path / shard)
    with pytest.raises(TypeError, match=r"down_proj\.weight: expected int8 packed int4.*w4afp8_jax\.convert"):
        w4.load_moe_experts(tmp_path, progress=False)

    save_file({k: v for k, v in tensors.items() if index.get(k) == "act_scales.safetensors"
               and k != EXPERT.format(1, 2, "w2") + ".input_scale"}, tmp_path / "act_scales.safetensors")
    save_file(content, tmp_path / shard)
    with pytest.raises(KeyError, match=r"experts\.2\.w2\.input_scale not found"):
        w4.load_moe_experts(tmp_path, progress=False)


def test_reader_agrees_with_safetensors(rng, tmp_path):
    arrays = {"a": rng.integers(-128, 128, (3, 5), dtype=np.int8), "b": rng.random((2, 7), dtype=np.float32),
              "c": rng.standard_normal(4).astype(ml_dtypes.bfloat16),
              "d": rng.standard_normal((2, 3)).astype(ml_dtypes.float8_e4m3fn)}
    save_file(arrays, tmp_path / "x.safetensors", metadata={"format": "np"})
    mine = SafetensorsFile(tmp_path / "x.safetensors")
    assert sorted(mine.names()) == sorted(arrays)
    with safe_open(tmp_path / "x.safetensors", "numpy") as f:
        for name in "abc":  # safetensors' numpy reader cannot return float8 (issue #682)
            np.testing.assert_array_equal(mine.tensor(name), f.get_tensor(name))
    for name, a in arrays.items():
        assert mine.tensor(name).dtype == a.dtype
        np.testing.assert_array_equal(mine.tensor(name).view(np.uint8), a.view(np.uint8))


@pytest.mark.gpu
def test_loaded_stack_on_the_cuda_path(rng, tmp_path):
    """Checkpoint -> load_moe_experts (tiled, on the GPU) -> moe over the layer stack on the CUDA
    path, against the reference path on the CPU (which defines the numerics; bound as in
    test_moe_gpu.py: a few one-ulp flips, 5e-3 normwise)."""
    write_checkpoint(tmp_path, rng, experts=16)
    experts = w4.load_moe_experts(tmp_path, progress=False)
    assert experts.w13.packed.devices() == {jax.devices()[0]}
    x = rng.standard_normal((8, H)).astype(ml_dtypes.bfloat16)
    ids = np.stack([rng.choice(16, 4, replace=False) for _ in range(8)]).astype(np.int32)
    tw = rng.random((8, 4)).astype(np.float32)

    def stack(x, ids, tw, experts, implementation):
        def layer(c, e):
            return c, w4.moe(x, ids, tw, e.w13, e.w2, a1_scale=e.a1_scale, a2_scale=e.a2_scale,
                             routed_scaling_factor=2.5, precision=jax.lax.Precision.HIGHEST,
                             implementation=implementation)
        return jax.lax.scan(layer, 0, experts)[1]

    got = jax.jit(lambda *a: stack(*a, "cuda"))(x, ids, tw, experts)
    cpu = jax.devices("cpu")[0]
    want = jax.jit(lambda *a: stack(*a, "reference"))(*jax.device_put((x, ids, tw, experts), cpu))
    got, want = np.asarray(got.astype(jnp.float32)), np.asarray(want.astype(jnp.float32))
    assert np.all(np.isfinite(got)) and np.linalg.norm(want) > 0
    assert np.linalg.norm(got - want) <= 5e-3 * np.linalg.norm(want)
