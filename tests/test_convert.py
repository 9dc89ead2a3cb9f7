"""The converter on a tiny FP8 block-scaled (and a bf16) DeepSeek-V3-style checkpoint written
here, against float64 math written from the recipe: w = fp8 * block scale, scale = f32(amax / 7)
per 128 inputs, q = clamp(round_half_even(w / scale), -8, 7); input scales = amax / 448."""

import json
import os
import re
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

import numpy_model as ref
import w4afp8_jax as w4
from w4afp8_jax.checkpoint import SafetensorsFile
from w4afp8_jax.convert import convert, main

H, INTER, E, MOE_LAYERS = 256, 384, 8, (1, 2)  # I = 384: 3 K groups for down, 3 row blocks for gate/up
CONFIG = {"n_routed_experts": E, "num_experts_per_tok": 2, "n_group": 4, "topk_group": 2, "first_k_dense_replace": 1,
          "quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}}
EXPERT = "model.layers.{}.mlp.experts.{}.{}_proj.{}"


def fp8_weight(rng, n, k):
    """e4m3 codes and f32 block scales with very different magnitudes per 128 x 128 block."""
    w = rng.standard_normal((n, k)).astype(ml_dtypes.float8_e4m3fn)
    scale = np.exp(rng.uniform(-8, -2, size=(-(-n // 128), -(-k // 128)))).astype(np.float32)
    return w, scale


def write_source(path, rng, fp8=True):
    path.mkdir()
    shards = [{}, {}]
    shards[0]["model.embed_tokens.weight"] = rng.standard_normal((16, H)).astype(ml_dtypes.bfloat16)
    shards[0]["model.layers.0.self_attn.o_proj.weight"], shards[0]["model.layers.0.self_attn.o_proj.weight_scale_inv"] = \
        fp8_weight(rng, H, H)
    for i, layer in enumerate(MOE_LAYERS):
        shard = shards[i]
        shard[f"model.layers.{layer}.mlp.gate.weight"] = (rng.standard_normal((E, H)) * 0.1).astype(ml_dtypes.bfloat16)
        shard[f"model.layers.{layer}.mlp.gate.e_score_correction_bias"] = (rng.random(E) * 0.1).astype(np.float32)
        shard[f"model.layers.{layer}.mlp.shared_experts.down_proj.weight"], \
            shard[f"model.layers.{layer}.mlp.shared_experts.down_proj.weight_scale_inv"] = fp8_weight(rng, H, INTER)
        for e in range(E):
            for proj, (n, k) in (("gate", (INTER, H)), ("up", (INTER, H)), ("down", (H, INTER))):
                name = EXPERT.format(layer, e, proj, "weight")
                if fp8:
                    shard[name], shard[name + "_scale_inv"] = fp8_weight(rng, n, k)
                else:
                    shard[name] = (rng.standard_normal((n, k)) * 0.02).astype(ml_dtypes.bfloat16)
    shard = shards[0]
    name = EXPERT.format(1, 5, "up", "weight")
    if fp8:
        shard[name + "_scale_inv"][1, 0] = 0.0  # an all-zero group: scale 1, codes 0
    else:
        shard[name][128:256, :128] = 0
    weight_map = {}
    for i, shard in enumerate(shards):
        save_file(shard, path / f"model-{i}.safetensors")
        weight_map.update(dict.fromkeys(shard, f"model-{i}.safetensors"))
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps(CONFIG))
    (path / "tokenizer.json").write_text("{}")
    return {k: v for s in shards for k, v in s.items()}


def expected_weight(src, name):
    """float64 dequantized source weight, block by block."""
    w = src[name].astype(np.float64)
    if name + "_scale_inv" in src:
        scale = src[name + "_scale_inv"]
        for i in range(scale.shape[0]):
            for j in range(scale.shape[1]):
                w[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128] *= np.float64(scale[i, j])
    return w


def expected_int4(w):
    n, k = w.shape
    g = w.reshape(n, k // 128, 128)
    amax = np.abs(g).max(-1)
    scale = np.where(amax > 0, amax / 7, 1).astype(np.float32)
    q = np.clip(np.rint(g / scale[..., None].astype(np.float64)), -8, 7)
    return q.reshape(n, k), scale


@pytest.mark.parametrize("fp8", [True, False])
def test_convert_matches_float64_recipe(rng, tmp_path, fp8):
    src = write_source(tmp_path / "src", rng, fp8)
    convert(tmp_path / "src", tmp_path / "dst", progress=False)
    dst = tmp_path / "dst"
    index = json.loads((dst / "model.safetensors.index.json").read_text())["weight_map"]
    files = {f: SafetensorsFile(dst / f) for f in set(index.values())}
    got = {name: files[f].tensor(name) for name, f in index.items()}

    for name, value in src.items():
        if ".mlp.experts." in name:
            continue
        assert got[name].dtype == value.dtype
        np.testing.assert_array_equal(got[name].view(np.uint8), value.view(np.uint8))  # copied bit for bit
    for layer in MOE_LAYERS:
        for e in range(E):
            for proj in ("gate", "up", "down"):
                name = EXPERT.format(layer, e, proj, "weight")
                packed, scale = got[name], got[name + "_scale_inv"]
                w = expected_weight(src, name)
                assert packed.dtype == np.int8 and packed.shape == (w.shape[0], w.shape[1] // 2)
                assert scale.dtype == np.float32 and scale.shape == (w.shape[0], w.shape[1] // 128)
                q_want, scale_want = expected_int4(w)
                np.testing.assert_array_equal(scale, scale_want)
                q = ref.unpack_int4(packed)
                np.testing.assert_array_equal(q, q_want)
                assert q.min() >= -7 and q.max() <= 7
                deq = ref.dequantize(packed, scale, 128)
                # Rounding to nearest: half a step, the step being the f32 scale (2^-20 slack for
                # the quotient's f64 rounding, |w / scale| <= 7 (1 + 2^-24)).
                assert np.all(np.abs(deq - w) <= np.repeat(scale, 128, axis=1) * (0.5 + 2**-20))
    assert got[EXPERT.format(1, 5, "up", "weight_scale_inv")][128:256, 0].tolist() == [1.0] * 128
    assert not np.any(ref.unpack_int4(got[EXPERT.format(1, 5, "up", "weight")])[128:256, :128])

    assert json.loads((dst / "hf_quant_config.json").read_text()) == {"quantization": {"quant_algo": "MIXED_PRECISION"}}
    config = json.loads((dst / "config.json").read_text())
    assert "quantization_config" not in config and config["n_routed_experts"] == E
    assert (dst / "tokenizer.json").read_text() == "{}"
    assert not (dst / "act_scales.safetensors").exists()  # no calibration: dynamic scales

    loaded = w4.load_moe_experts(dst, progress=False)
    assert loaded.layers == MOE_LAYERS and loaded.a1_scale is None and loaded.a2_scale is None
    np.testing.assert_allclose(np.asarray(loaded.w13.dequantize()[0, 3, :INTER]),  # one f32 rounding
                               ref.dequantize(got[EXPERT.format(1, 3, "gate", "weight")],
                                              got[EXPERT.format(1, 3, "gate", "weight_scale_inv")], 128), rtol=2**-24)


def test_calibration_writes_routed_amax_over_448(rng, tmp_path, capsys):
    src = write_source(tmp_path / "src", rng)
    inputs = {layer: rng.standard_normal((12, H)).astype(np.float32) * (layer + 1) for layer in MOE_LAYERS}
    np.savez(tmp_path / "calib.npz", **{f"layers.{layer}": x for layer, x in inputs.items()})
    main([str(tmp_path / "src"), str(tmp_path / "dst"), "--calibration", str(tmp_path / "calib.npz"), "--no-progress"])
    assert capsys.readouterr().out.endswith("; static activation scales in act_scales.safetensors\n")
    scales = SafetensorsFile(tmp_path / "dst" / "act_scales.safetensors")
    for layer, x in inputs.items():
        x = x.astype(np.float64)
        gate = src[f"model.layers.{layer}.mlp.gate.weight"].astype(np.float64)
        bias = src[f"model.layers.{layer}.mlp.gate.e_score_correction_bias"]
        _, ids, margins = ref.deepseek_topk((x @ gate.T).astype(np.float32), bias, top_k=2, n_group=4, topk_group=2)
        assert margins.min() > 1e-6  # f32 routing picks the same experts
        a13, a2 = {}, {}
        for e in range(E):
            xe = x[np.any(ids == e, axis=1)]
            if len(xe):
                g = xe @ expected_weight(src, EXPERT.format(layer, e, "gate", "weight")).T
                u = xe @ expected_weight(src, EXPERT.format(layer, e, "up", "weight")).T
                a13[e], a2[e] = np.abs(xe).max(), np.abs(g / (1 + np.exp(-g)) * u).max()
        for e in range(E):
            got = [float(scales.tensor(f"model.layers.{layer}.mlp.experts.{e}.{gemm}.input_scale")[0])
                   for gemm in ("w1", "w3", "w2")]
            want13 = a13.get(e, max(a13.values())) / 448
            want2 = a2.get(e, max(a2.values())) / 448
            np.testing.assert_allclose(got, [want13, want13, want2], rtol=2**-23)  # one f32 rounding
        loaded = w4.load_moe_experts(tmp_path / "dst", layers=[layer], progress=False)
        np.testing.assert_allclose(float(loaded.a1_scale[0]), max(a13.values()) / 448, rtol=2**-23)
        np.testing.assert_allclose(float(loaded.a2_scale[0]), max(a2.values()) / 448, rtol=2**-23)


def test_convert_errors(rng, tmp_path):
    write_source(tmp_path / "src", rng)
    with pytest.raises(ValueError, match=r"calibration has no inputs for MoE layers \[2\]"):
        convert(tmp_path / "src", tmp_path / "dst", calibration={1: np.ones((2, H), np.float32)}, progress=False)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(FileExistsError, match="not empty"):
        convert(tmp_path / "src", tmp_path / "full", progress=False)
    convert(tmp_path / "src", tmp_path / "dst", progress=False)
    with pytest.raises(TypeError, match=r"experts\.0\.(gate|up|down)_proj\.weight: already int8"):
        convert(tmp_path / "dst", tmp_path / "again", progress=False)
    assert not (tmp_path / "again").exists()  # checked before writing


def test_cli_user_errors_are_one_line(rng, tmp_path, capsys):
    """The command line turns the checks' errors into `prog: error: ...` and exit status 1."""
    write_source(tmp_path / "src", rng)
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "file").write_text("x")
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "src"), str(tmp_path / "dst"), "--no-progress"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("python -m w4afp8_jax.convert: error: dst: ") and "exists and is not empty" in err
    assert "Traceback" not in err
    # A missing source is named as the command's argument, src (a fresh-user trial saw `path`).
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "missing"), str(tmp_path / "dst2"), "--no-progress"])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.startswith("python -m w4afp8_jax.convert: error: src: ")


def test_cli_prints_a_summary_without_a_terminal(rng, tmp_path):
    """With stderr not a terminal (so no progress bar) the command still says what it wrote:
    one line on stdout naming dst, the layers, experts and tensors, and the missing scales."""
    src = write_source(tmp_path / "src", rng)
    dst = tmp_path / "dst"
    done = subprocess.run([sys.executable, "-m", "w4afp8_jax.convert", str(tmp_path / "src"), str(dst)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ, check=False)
    assert done.returncode == 0, done.stderr
    copied = sum(".mlp.experts." not in name for name in src)
    size = sum(os.path.getsize(dst / f"model-{i}.safetensors") for i in range(2)) / 2**20  # headers: < 0.1 MiB
    assert re.fullmatch(rf"wrote W4AFP8 checkpoint {re.escape(str(dst))}: 2 MoE layers \(1-2\), {E} routed "
                        rf"experts each, {2 * E * 3} expert weights \(float8_e4m3fn\) quantized to int4, {copied} other "
                        rf"tensors copied, 2 files, ([0-9.]+) MiB; no activation scales \(dynamic at run time; "
                        r"--calibration writes static ones\)\n", done.stdout), done.stdout
    assert abs(float(re.search(r"([0-9.]+) MiB", done.stdout)[1]) - size) < 0.1
    assert (dst / "hf_quant_config.json").exists()


def test_cli_help_names_the_source_tensors(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for name in ("model.layers.{L}.mlp.experts.{e}.{gate,up,down}_proj.weight",
                 "model.layers.{L}.mlp.experts.{e}.{gate,up,down}_proj.weight_scale_inv", "FP8 e4m3", "bf16",
                 "model.layers.{L}.mlp.gate.weight", "model.layers.{L}.mlp.gate.e_score_correction_bias",
                 "model.layers.{L}.mlp.experts.{e}.{w1,w3,w2}.input_scale"):
        assert name in out, name
