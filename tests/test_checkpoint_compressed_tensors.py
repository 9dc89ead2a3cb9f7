"""load_moe_experts on compressed-tensors "pack-quantized" checkpoints (llm-compressor's W4AFP8:
int4 group-128 weights packed eight per int32, dynamic per-token fp8 activations), written here
with numpy and safetensors' own writer; the int32 words are built arithmetically from the rule
of compressed-tensors' pack_to_int32 (u = q + 8; element 8c + i in bits [4i, 4i + 4) of word c),
not from bytes, so the loader's byte-level conversion is checked against the rule itself."""

import copy
import json
import warnings

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from safetensors.numpy import save_file

import numpy_model as ref
import w4afp8_jax as w4
from helpers import Model, assert_moe_close, routed_tokens
from w4afp8_jax.checkpoint import SafetensorsFile

H, INTER, E, MOE_LAYERS = 256, 256, 8, (1, 2, 3)
MODULE = "model.layers.{}.mlp.experts.{}.{}_proj"
PROJS = ("gate", "up", "down")
SCHEME = {  # llm-compressor's W4AFP8 preset as config.json serializes it
    "targets": ["Linear"],
    "weights": {"num_bits": 4, "type": "int", "symmetric": True, "group_size": 128, "strategy": "group",
                "block_structure": None, "dynamic": False, "actorder": None, "observer": "minmax",
                "observer_kwargs": {}},
    "input_activations": {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None,
                          "strategy": "token", "block_structure": None, "dynamic": True, "actorder": None,
                          "observer": None, "observer_kwargs": {}},
    "output_activations": None,
}
ROUTER = {"top_k": 2, "n_group": 2, "topk_group": 1, "routed_scaling_factor": 2.5, "implementation": "reference"}


def quantization_config(scheme=SCHEME, **top):
    qc = {"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {"group_0": scheme},
          "ignore": ["lm_head", "re:.*mlp.gate$"], "kv_cache_scheme": None, "quantization_status": "compressed",
          "global_compression_ratio": None, "sparsity_config": {}}
    qc.update(top)
    return qc


def pack_to_int32(q):
    """int [N, K] in [-8, 7] -> int32 [N, K/8]: word c = sum_i (q[8c + i] + 8) << 4i, mod 2^32."""
    n, k = q.shape
    u = (np.asarray(q, np.int64) + 8).reshape(n, k // 8, 8)
    words = np.sum(u << (4 * np.arange(8, dtype=np.int64)), axis=-1) & 0xFFFFFFFF
    return words.astype(np.uint32).view(np.int32)


def draw(rng, layers=MOE_LAYERS, experts=E, hidden=H, inter=INTER, group_size=128):
    """{(layer, expert, proj): (q int8 [N, K] in [-8, 7], scales bf16 [N, K/group_size] > 0)}."""
    values = {}
    for layer in layers:
        for e in range(experts):
            for proj, (n, k) in zip(PROJS, ((inter, hidden), (inter, hidden), (hidden, inter))):
                q = rng.integers(-8, 8, size=(n, k), dtype=np.int8)
                scale = (rng.random((n, k // group_size)) * 0.01 + 1e-3).astype(ml_dtypes.bfloat16)
                values[layer, e, proj] = q, scale
    return values


def write_shards(path, shards, config):
    path.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-0000{i + 1}-of-0000{len(shards)}.safetensors"
        save_file(shard, path / name)
        weight_map.update(dict.fromkeys(shard, name))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps(config))


def router(rng, shard, layer, experts, hidden):
    shard[f"model.layers.{layer}.mlp.gate.weight"] = rng.standard_normal((experts, hidden)).astype(ml_dtypes.bfloat16)
    shard[f"model.layers.{layer}.mlp.gate.e_score_correction_bias"] = rng.random(experts, dtype=np.float32)


def write_ct(path, rng, values, *, qc=None, shared=None, experts=E, hidden=H):
    """A compressed-tensors checkpoint of `values` (layers spread over two shards, a bf16 router
    per MoE layer); shared: {layer: {proj: (q, scale)}} int4 shared experts. Returns the tensors."""
    shards = [{}, {}]
    shards[0]["model.embed_tokens.weight"] = rng.standard_normal((32, hidden)).astype(ml_dtypes.bfloat16)
    layers = sorted({layer for layer, _, _ in values})
    for (layer, e, proj), (q, scale) in values.items():
        module = MODULE.format(layer, e, proj)
        shard = shards[layers.index(layer) % 2]
        shard[module + ".weight_packed"] = pack_to_int32(q)
        shard[module + ".weight_scale"] = scale
        shard[module + ".weight_shape"] = np.asarray(q.shape, np.int64)
    for layer in layers:
        router(rng, shards[layers.index(layer) % 2], layer, experts, hidden)
        for proj, (q, scale) in (shared or {}).get(layer, {}).items():
            module = f"model.layers.{layer}.mlp.shared_experts.{proj}_proj"
            shards[0].update({module + ".weight_packed": pack_to_int32(q), module + ".weight_scale": scale,
                              module + ".weight_shape": np.asarray(q.shape, np.int64)})
    write_shards(path, shards, {"n_routed_experts": experts, "first_k_dense_replace": 1,
                                "quantization_config": quantization_config() if qc is None else qc})
    return {k: v for shard in shards for k, v in shard.items()}


def write_w4afp8(path, values, experts=E):
    """The same quantized values as a W4AFP8 checkpoint (int8 two per byte, f32 scales)."""
    shard = {}
    for (layer, e, proj), (q, scale) in values.items():
        module = MODULE.format(layer, e, proj)
        shard[module + ".weight"] = ref.pack_int4(q).view(np.int8)
        shard[module + ".weight_scale_inv"] = scale.astype(np.float32)
    write_shards(path, [shard], {"n_routed_experts": experts})
    (path / "hf_quant_config.json").write_text(json.dumps({"quantization": {"quant_algo": "MIXED_PRECISION"}}))


def expected(values, layers, experts, tp_size=1, tp_rank=0, inter=INTER):
    """(q13 [L, E, 2I/P, H], s13 f32, q2 [L, E, H, I/P], s2 f32) sliced by hand from `values`."""
    local = inter // tp_size
    rows = slice(tp_rank * local, (tp_rank + 1) * local)
    group = values[layers[0], experts[0], "down"][0].shape[1] // values[layers[0], experts[0], "down"][1].shape[1]
    cols = slice(tp_rank * local // group, (tp_rank + 1) * local // group)

    def stack(fn):
        return np.stack([np.stack([fn(l, e) for e in experts]) for l in layers])

    v = lambda l, e, proj, i: values[l, e, proj][i]  # noqa: E731
    q13 = stack(lambda l, e: np.concatenate([v(l, e, "gate", 0)[rows], v(l, e, "up", 0)[rows]]))
    s13 = stack(lambda l, e: np.concatenate([v(l, e, "gate", 1)[rows], v(l, e, "up", 1)[rows]]).astype(np.float32))
    q2 = stack(lambda l, e: v(l, e, "down", 0)[:, rows])
    s2 = stack(lambda l, e: v(l, e, "down", 1)[:, cols].astype(np.float32))
    return q13, s13, q2, s2


def load(path, **kwargs):
    """load_moe_experts, with the per-token warning a W4AFP8 compressed-tensors load gives."""
    with pytest.warns(UserWarning, match="declares dynamic per-token fp8 activation scales: pass activation_scaling"):
        return w4.load_moe_experts(path, progress=False, **kwargs)


def assert_values(got, want):
    q13, s13, q2, s2 = want
    for w, q, s in ((got.w13, q13, s13), (got.w2, q2, s2)):
        np.testing.assert_array_equal(np.asarray(w.int4_values()), q)
        np.testing.assert_array_equal(np.asarray(w.checkpoint_packed()), ref.pack_int4(q))  # the model's packing
        np.testing.assert_array_equal(np.asarray(w.scales), s)


@pytest.mark.parametrize("layout", ["tiled", "checkpoint"])
def test_loads_the_quantized_values(rng, tmp_path, layout):
    values = draw(rng)
    write_ct(tmp_path, rng, values)
    got = load(tmp_path, layout=layout)
    assert got.layers == MOE_LAYERS and got.w13.layout == got.w2.layout == layout
    assert got.w13.packed.shape == (3, E, 2 * INTER, H // 2) and got.w2.packed.shape == (3, E, H, INTER // 2)
    assert got.a1_scale is None and got.a2_scale is None and got.activation_scaling == "per_token"
    assert_values(got, expected(values, MOE_LAYERS, range(E)))
    # Exactly the dequantized values q * scale (int4 times a bf16 scale is exact in f32).
    q13, s13, _, _ = expected(values, MOE_LAYERS, range(E))
    want = (q13.reshape(3, E, 2 * INTER, H // 128, 128) * s13[..., None].astype(np.float64)).reshape(q13.shape)
    np.testing.assert_array_equal(np.asarray(got.w13.dequantize(), np.float64), want)


def test_layer_matches_the_float64_model(rng, tmp_path):
    """A loaded layer through `moe` on the reference path (dynamic per-tensor scales, what
    per-token checkpoints run with today) against the float64 model of the same int4 values."""
    values = draw(rng)
    write_ct(tmp_path, rng, values)
    got = load(tmp_path, layers=[2], layout="checkpoint")
    x, ids, tw = routed_tokens(rng, 16, H, E, 2)
    out = w4.moe(x, ids, tw, got.w13.layer(0), got.w2.layer(0), routed_scaling_factor=2.5,
                 implementation="reference")
    q13, s13, q2, s2 = expected(values, [2], range(E))
    assert_moe_close(out, Model(x, ids, tw, ref.pack_int4(q13[0]), s13[0], ref.pack_int4(q2[0]), s2[0],
                                routed_scaling_factor=2.5))


@pytest.mark.parametrize("layout", ["tiled", "checkpoint"])
def test_both_formats_load_bitwise_identical_weights(rng, tmp_path, layout):
    values = draw(rng)
    write_ct(tmp_path / "ct", rng, values)
    write_w4afp8(tmp_path / "w4afp8", values)
    for kwargs in ({}, dict(layers=[3, 1], tp_size=2, tp_rank=1, expert_ids=[5, 2, 7])):
        ct = load(tmp_path / "ct", layout=layout, **kwargs)
        trt = w4.load_moe_experts(tmp_path / "w4afp8", layout=layout, progress=False, **kwargs)
        assert ct.activation_scaling == "per_token" and trt.activation_scaling == "per_tensor"
        for a, b in ((ct.w13, trt.w13), (ct.w2, trt.w2)):
            assert (a.group_size, a.layout) == (b.group_size, b.layout)
            np.testing.assert_array_equal(np.asarray(a.packed), np.asarray(b.packed))
            np.testing.assert_array_equal(np.asarray(a.scales).view(np.uint32), np.asarray(b.scales).view(np.uint32))


@pytest.mark.parametrize("tp_size", [1, 2])
def test_tensor_and_expert_parallel_slices(rng, tmp_path, tp_size):
    values = draw(rng)
    write_ct(tmp_path, rng, values)
    for tp_rank in range(tp_size):
        for experts in ([6, 1, 3], list(range(E))):
            got = load(tmp_path, layers=[3, 1], tp_size=tp_size, tp_rank=tp_rank, expert_ids=experts)
            assert got.layers == (3, 1)
            assert_values(got, expected(values, [3, 1], experts, tp_size, tp_rank))


def test_sharded_placement_reads_each_devices_block(rng, tmp_path):
    values = draw(rng)
    write_ct(tmp_path, rng, values)
    devices = jax.devices("cpu")
    if len(devices) < 4:
        pytest.skip("needs 4 (simulated) CPU devices")
    mesh = Mesh(np.array(devices[:4]).reshape(2, 2), ("ep", "rows"))
    got = load(tmp_path, sharding=NamedSharding(mesh, P(None, "ep", "rows")))
    assert got.w13.packed.sharding.spec == P(None, "ep", "rows")
    assert_values(got, expected(values, MOE_LAYERS, range(E)))
    got = load(tmp_path, layers=[1, 2], layout="checkpoint",
               sharding=lambda name, shape: NamedSharding(mesh, P("ep") if len(shape) == 4 else P()))
    assert got.w2.scales.sharding.spec == P("ep")
    assert_values(got, expected(values, [1, 2], range(E)))


def test_other_group_sizes_load_for_the_reference_path(rng, tmp_path):
    """group_size 64: W4Weights take it on the reference path (layout="checkpoint"); the tiled
    layout (the CUDA path) needs 128 and says so before reading."""
    values = draw(rng, group_size=64)
    scheme = copy.deepcopy(SCHEME)
    scheme["weights"]["group_size"] = 64
    write_ct(tmp_path, rng, values, qc=quantization_config(scheme))
    got = load(tmp_path, layout="checkpoint", tp_size=2, tp_rank=1, expert_ids=[4, 0])
    assert got.w13.group_size == got.w2.group_size == 64
    assert_values(got, expected(values, MOE_LAYERS, [4, 0], 2, 1))
    with pytest.raises(ValueError, match="layout='tiled' needs group_size 128.*group_size 64.*layout='checkpoint'"):
        w4.load_moe_experts(tmp_path, progress=False)


def test_dynamic_per_tensor_activations_load_without_a_warning(rng, tmp_path):
    scheme = copy.deepcopy(SCHEME)
    scheme["input_activations"]["strategy"] = "tensor"
    values = draw(rng, layers=(1,))
    write_ct(tmp_path, rng, values, qc=quantization_config(scheme))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = w4.load_moe_experts(tmp_path, progress=False)
    assert got.activation_scaling == "per_tensor" and got.a1_scale is None and got.a2_scale is None


def changed(path, value):
    """quantization_config with `value` set at `path` (keys; "scheme" = config_groups.group_0)."""
    qc = quantization_config(copy.deepcopy(SCHEME))
    node = qc["config_groups"]["group_0"] if path[0] == "scheme" else qc
    for key in path[1:-1] if path[0] == "scheme" else path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return qc


UNSUPPORTED = {  # what a config says -> what the ValueError must name
    "asymmetric": (changed(("scheme", "weights", "symmetric"), False), r"group_0\.weights: asymmetric int4"),
    "group size 100": (changed(("scheme", "weights", "group_size"), 100), r"weights: group_size 100 is not supported"),
    "act-order": (changed(("scheme", "weights", "actorder"), "group"), r"weights: actorder 'group' \(act-order"),
    "int8 weights": (changed(("scheme", "weights", "num_bits"), 8), r"weights: num_bits 8, type 'int'"),
    "channel strategy": (changed(("scheme", "weights", "strategy"), "channel"), r"weights: strategy 'channel'"),
    "int-quantized": (changed(("format",), "int-quantized"), r"group_0: format 'int-quantized' is not supported"),
    "mixed-precision": (changed(("format",), "mixed-precision"), r"format 'mixed-precision'"),
    "weight-only": (changed(("scheme", "input_activations"), None), r"input_activations: None \(weight-only"),
    "static activations": (changed(("scheme", "input_activations", "dynamic"), False),
                           r"input_activations: dynamic False: static input scales"),
    "int8 activations": (changed(("scheme", "input_activations", "type"), "int"), r"only fp8 activations"),
    "token-group activations": (changed(("scheme", "input_activations", "strategy"), "group"),
                                r"input_activations: strategy 'group'"),
    "output activations": (changed(("scheme", "output_activations"), SCHEME["input_activations"]), r"layer outputs"),
    "ignored experts": (changed(("ignore",), ["lm_head", "re:.*mlp\\.experts\\..*"]),
                        r"experts\.0\.down_proj: matched by config\.json quantization_config\.ignore"),
    "untargeted experts": (changed(("scheme", "targets"), ["re:.*self_attn.*"]), r"no target .* matches it"),
    "preset name": (changed(("config_groups",), {"W4AFP8": ["Linear"]}), r"W4AFP8: expected a scheme.*preset"),
    "sparse": (changed(("sparsity_config",), {"format": "sparse-24-bitmask"}), r"sparsity_config: format"),
    "transforms": (changed(("transform_config",), {"config_groups": {"u": {"type": "hadamard"}}}),
                   r"transform_config"),
}


@pytest.mark.parametrize("case", list(UNSUPPORTED))
def test_unsupported_schemes_raise_naming_them(rng, tmp_path, monkeypatch, case):
    qc, message = UNSUPPORTED[case]
    write_ct(tmp_path, rng, draw(rng, layers=(1,), experts=2), qc=qc, experts=2)

    def no_reads(self, name):
        raise AssertionError(f"read {name} before rejecting the scheme")

    monkeypatch.setattr(SafetensorsFile, "tensor", no_reads)
    with pytest.raises(ValueError, match=message):
        w4.load_moe_experts(tmp_path, layout="checkpoint", progress=False)


def test_experts_of_different_schemes_raise(rng, tmp_path):
    """A more specific target (a regex) wins over "Linear", as in compressed-tensors: layer 3's
    experts fall in a group of group size 64, so the experts do not share one scheme."""
    other = copy.deepcopy(SCHEME)
    other.update(targets=[r"re:model\.layers\.3\..*"])
    other["weights"]["group_size"] = 64
    qc = quantization_config()
    qc["config_groups"]["group_1"] = other
    write_ct(tmp_path, rng, draw(rng, layers=(2, 3), experts=2), qc=qc, experts=2)
    with pytest.raises(ValueError, match=r"different schemes: .*layers\.2\.mlp.* in group_0 \(group_size 128.*"
                                         r"layers\.3\.mlp.* in group_1 \(group_size 64"):
        w4.load_moe_experts(tmp_path, progress=False)


def test_tensor_errors_name_the_tensor(rng, tmp_path, monkeypatch):
    values = draw(rng, layers=(1, 2), experts=2)
    tensors = write_ct(tmp_path, rng, values, experts=2)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    target = MODULE.format(2, 1, "down")
    shard = index[target + ".weight_packed"]
    content = {k: v for k, v in tensors.items() if index.get(k) == shard}
    real_tensor = SafetensorsFile.tensor

    def header_only(self, name):  # weight bytes must not be read before the checks
        if not name.endswith("weight_shape"):
            raise AssertionError(f"read {name} before checking every header")
        return real_tensor(self, name)

    monkeypatch.setattr(SafetensorsFile, "tensor", header_only)
    bad = {target + ".weight_shape": (np.asarray([H, INTER + 8], np.int64),
                                      ValueError, r"down_proj\.weight_shape: \[256, 264\], where .* \[256, 256\]"),
           target + ".weight_packed": (ref.pack_int4(values[2, 1, "down"][0]).view(np.int8),
                                       TypeError, r"down_proj\.weight_packed: expected int32 packed int4"),
           target + ".weight_scale": (np.ones((H, 3), ml_dtypes.bfloat16),
                                      ValueError, r"down_proj\.weight_scale: expected shape \[256, 2\], got \[256, 3\]")}
    for name, (value, error, message) in bad.items():
        save_file({**content, name: value}, tmp_path / shard)
        with pytest.raises(error, match=message):
            w4.load_moe_experts(tmp_path, progress=False)


def test_moe_experts_records_the_activation_scaling_through_pytree_ops(rng, tmp_path):
    values = draw(rng, layers=(1, 2), experts=2)
    write_ct(tmp_path, rng, values, experts=2)
    got = load(tmp_path, layout="checkpoint")
    assert jax.tree.map(jnp.asarray, got).activation_scaling == "per_token"
    seen = jax.lax.scan(lambda c, layer: (c, layer.w13.packed.sum()), 0, got)[1]
    assert seen.shape == (2,)
    # The existing constructor keeps working: a checkpoint without a declaration is per-tensor.
    assert w4.MoEExperts(got.w13, got.w2, None, None, layers=(1, 2)).activation_scaling == "per_tensor"
    with pytest.raises(ValueError, match="activation_scaling must be one of"):
        w4.MoEExperts(got.w13, got.w2, None, None, activation_scaling="per_row")


def test_nnx_block_from_a_compressed_tensors_checkpoint(rng, tmp_path):
    """DeepseekV3MoE.from_checkpoint: the routed experts as `moe` runs them, plus the int4
    shared expert dequantized to bf16 (float64 model: bf16 x, weights and h)."""
    pytest.importorskip("flax.nnx")
    from w4afp8_jax.nnx import DeepseekV3MoE

    values = draw(rng, layers=(1, 2))
    shared_inter = 128
    shared = {layer: {proj: (rng.integers(-8, 8, size=(n, k), dtype=np.int8),
                             (rng.random((n, k // 128)) * 0.02 + 1e-3).astype(ml_dtypes.bfloat16))
                      for proj, (n, k) in zip(PROJS, ((shared_inter, H), (shared_inter, H), (H, shared_inter)))}
              for layer in (1, 2)}
    tensors = write_ct(tmp_path, rng, values, shared=shared)
    with pytest.warns(UserWarning, match="per-token"):
        block = DeepseekV3MoE.from_checkpoint(tmp_path, layers=2, progress=False, **ROUTER)
    x = jnp.asarray(rng.standard_normal((5, H)), jnp.bfloat16)
    got = np.asarray(block(x).astype(jnp.float32), np.float64)

    gate = tensors["model.layers.2.mlp.gate.weight"].astype(np.float32)
    logits = jnp.dot(jnp.asarray(x, jnp.float32), jnp.asarray(gate).T, precision=jax.lax.Precision.HIGHEST)
    tw, ids = w4.deepseek_topk(logits, tensors["model.layers.2.mlp.gate.e_score_correction_bias"], top_k=2, n_group=2,
                               topk_group=1)
    q13, s13, q2, s2 = expected(values, [2], range(E))
    routed = w4.moe(x, ids, tw, w4.W4Weights(ref.pack_int4(q13[0]), s13[0]), w4.W4Weights(ref.pack_int4(q2[0]), s2[0]),
                    activation_scaling="per_token", routed_scaling_factor=2.5, implementation="reference")

    def weight(proj):
        q, scale = shared[2][proj]
        w = (q.reshape(q.shape[0], -1, 128) * scale.astype(np.float64)[..., None]).reshape(q.shape)
        return w.astype(ml_dtypes.bfloat16).astype(np.float64)

    xb = np.asarray(x, ml_dtypes.bfloat16).astype(np.float64)
    g, u = xb @ weight("gate").T, xb @ weight("up").T
    h = (g / (1 + np.exp(-g)) * u).astype(ml_dtypes.bfloat16).astype(np.float64)
    shared_out = h @ weight("down").T
    want = np.asarray(routed.astype(jnp.float32), np.float64) + shared_out
    assert np.linalg.norm(shared_out) > 0.3 * np.linalg.norm(want)  # the shared expert matters
    # As tests/test_nnx.py: bf16 roundings of the output and f32-vs-f64 sums, 4e-3 normwise.
    assert np.linalg.norm(got - want) <= 4e-3 * np.linalg.norm(want)
