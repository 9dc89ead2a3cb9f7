"""Decode with a stack of W4AFP8 DeepSeek-V3 MoE layers read from a checkpoint on disk.

1. Writes a W4AFP8 checkpoint in the real layout (model.layers.{L}.mlp.experts.{e}.{gate,up,down}_proj
   .weight int8 + weight_scale_inv f32, act_scales.safetensors, the index, hf_quant_config.json)
   to a temporary directory: L MoE layers of DeepSeek-V3 tensor-parallel-4 shapes (H = 7168,
   I = 512 per device, 8 of E experts per token), made from random bf16 weights (normal * 0.02)
   with the published recipe (scale = amax / 7 per 128 inputs, codes -7..7), a random router, and
   static input scales calibrated on the bf16 model (amax / 448 of each expert's inputs).
2. Loads it with `w4afp8_jax.load_moe_experts` (routed experts stacked [L, E, ...]).
3. Runs a jitted decode step, `lax.scan` over the layer stack (x = x + moe(rmsnorm(x)) per layer,
   DeepSeek-V3's router; each layer's weights read in place through `W4Weights.layer(i)`), for a
   number of steps, each step's output feeding the next, and prints the time per step, tokens/s,
   the error of each layer's MoE output against the bf16 layer on the same input, and how far
   the two stacks run apart from the same step input.

  python examples/deepseek_v3_decode.py [--layers 8] [--experts 256] [--batch 32] [--steps 20]
                                        [--implementation auto|cuda|reference]

Defaults: on a GPU with the CUDA module, L = 8 layers of 256 experts (~11 GB of int4 on disk,
~45 GB of bf16 reference weights on the device); otherwise the reference path with L = 2 layers
of 16 experts and batch 4, one to two minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

try:
    import w4afp8_jax
except ImportError:  # a source checkout: python examples/deepseek_v3_decode.py
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    import w4afp8_jax

from w4afp8_jax import deepseek_topk, load_moe_experts, moe, quantize_weights
from w4afp8_jax.checkpoint import Checkpoint
from w4afp8_jax.shapes import DEEPSEEK_V3_TP4

SHAPE = DEEPSEEK_V3_TP4
FIRST_MOE_LAYER = 3  # DeepSeek-V3's first_k_dense_replace
HP = jax.lax.Precision.HIGHEST


IMPLEMENTATIONS = ("auto", "cuda", "reference")


def resolve_implementation() -> str:
    """--implementation, read before the other options since their defaults depend on it."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--implementation", choices=IMPLEMENTATIONS, default="auto")
    try:
        return w4afp8_jax.resolve_implementation(pre.parse_known_args()[0].implementation)
    except RuntimeError as e:  # "cuda" asked for where it cannot run: say why
        sys.exit(str(e))


def parse_args(on_gpu: bool):
    where = "the CUDA path" if on_gpu else "the reference path"
    p = argparse.ArgumentParser(description=f"{__doc__.splitlines()[0].rstrip('.')} (defaults for {where})",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--implementation", choices=IMPLEMENTATIONS, default="auto",
                   help="auto: the CUDA path when a GPU and the CUDA module are there")
    p.add_argument("--layers", type=int, default=8 if on_gpu else 2, help="MoE layers in the checkpoint")
    p.add_argument("--experts", type=int, default=SHAPE.experts if on_gpu else 16,
                   help=f"a multiple of {SHAPE.n_group}, at least {2 * SHAPE.n_group}")
    p.add_argument("--batch", type=int, default=32 if on_gpu else 4, help="tokens decoded per step")
    p.add_argument("--steps", type=int, default=20 if on_gpu else 3, help="timed decode steps")
    p.add_argument("--checkpoint-dir", help="write (and keep) the checkpoint here instead of a temporary directory")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic weights and inputs")
    args = p.parse_args()
    if args.experts < 2 * SHAPE.n_group or args.experts % SHAPE.n_group:
        p.error(f"--experts must be a multiple of {SHAPE.n_group} and at least {2 * SHAPE.n_group}")
    return args


def rmsnorm(x):
    x = x.astype(jnp.float32)
    return (x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)).astype(jnp.bfloat16)


def route(h, gate, bias):
    logits = jnp.dot(h.astype(jnp.float32), gate.astype(jnp.float32).T, precision=HP)
    return deepseek_topk(logits, bias, top_k=SHAPE.top_k, n_group=SHAPE.n_group, topk_group=SHAPE.topk_group)


def bf16_layer(x, gate, bias, w13, w2):
    """The unquantized MoE layer (bf16 weights, f32 math, every expert; coefficient 0 where not
    routed). Returns (moe output, per-expert amax of routed inputs, of routed silu(gate) * up)."""
    h = rmsnorm(x)
    topk_weights, topk_ids = route(h, gate, bias)
    num_experts = w13.shape[0]
    coef = jnp.zeros((x.shape[0], num_experts), jnp.float32).at[jnp.arange(x.shape[0])[:, None], topk_ids].add(topk_weights)
    gate_up = jnp.einsum("bh,enh->ben", h.astype(jnp.float32), w13.astype(jnp.float32), precision=HP)
    inter = gate_up.shape[-1] // 2
    act = jax.nn.silu(gate_up[..., :inter]) * gate_up[..., inter:]
    y = jnp.einsum("be,bei,ehi->bh", coef, act, w2.astype(jnp.float32), precision=HP) * SHAPE.routed_scaling_factor
    routed = coef > 0
    amax_in = jnp.max(jnp.where(routed[:, :, None], jnp.abs(h.astype(jnp.float32))[:, None, :], 0), axis=(0, 2))
    amax_act = jnp.max(jnp.where(routed[:, :, None], jnp.abs(act), 0), axis=(0, 2))
    return y, amax_in, amax_act


@jax.jit
def bf16_layers_on(xs, gates, biases, w13s, w2s):
    """Each bf16 layer on a given input: xs [L, B, H] -> MoE outputs [L, B, H] f32."""
    return jax.lax.map(lambda layer: bf16_layer(*layer)[0], (xs, gates, biases, w13s, w2s))


@jax.jit
def bf16_stack(x, gates, biases, w13s, w2s):
    """L layers x = x + moe(rmsnorm(x)) with the bf16 weights; returns (per-layer MoE outputs
    [L, B, H] f32, amax stats [L, E] x 2)."""
    def body(x, layer):
        y, amax_in, amax_act = bf16_layer(x, *layer)
        return (x.astype(jnp.float32) + y).astype(jnp.bfloat16), (y, amax_in, amax_act)
    _, out = jax.lax.scan(body, x, (gates, biases, w13s, w2s))
    return out


def w4_stack(x, gates, biases, experts, implementation):
    """The same stack with the W4AFP8 experts: returns (next x, per-layer inputs and MoE outputs,
    both [L, B, H]).

    The scan runs over layer indices and hands `moe` layer views of the stacked weights
    (`W4Weights.layer(i)`): the kernels read layer i in place, where scanning over the weights
    themselves would make XLA copy every layer's weights first."""
    def body(x, layer):
        i, gate, bias = layer
        h = rmsnorm(x)
        topk_weights, topk_ids = route(h, gate, bias)
        y = moe(h, topk_ids, topk_weights, experts.w13.layer(i), experts.w2.layer(i), a1_scale=experts.a1_scale[i],
                a2_scale=experts.a2_scale[i], routed_scaling_factor=SHAPE.routed_scaling_factor,
                implementation=implementation)
        return (x.astype(jnp.float32) + y.astype(jnp.float32)).astype(jnp.bfloat16), (x, y)
    x, (xs, ys) = jax.lax.scan(body, x, (jnp.arange(len(experts.layers)), gates, biases))
    return rmsnorm(x), xs, ys  # the next step's input first


@functools.partial(jax.jit, donate_argnums=0)
def _fill_layer(buf, i, key):
    """buf[i] = normal * 0.02 in bf16, in place (one layer's f32 temporary at a time)."""
    layer = (jax.random.normal(key, buf.shape[1:], jnp.float32) * 0.02).astype(buf.dtype)
    return jax.lax.dynamic_update_index_in_dim(buf, layer, i, 0)


def make_bf16_weights(key, layers, experts, on_gpu):
    """Random bf16 router and expert weights (normal * 0.02), layer by layer; on the CPU with
    numpy (jax.random is several times slower there)."""
    h, inter = SHAPE.hidden, SHAPE.intermediate
    shapes = {"gate": (layers, experts, h), "w13": (layers, experts, 2 * inter, h), "w2": (layers, experts, h, inter)}
    out = {}
    for j, (name, shape) in enumerate(shapes.items()):
        if on_gpu:
            buf = jnp.zeros(shape, jnp.bfloat16)
            for i in range(layers):
                buf = _fill_layer(buf, i, jax.random.fold_in(jax.random.fold_in(key, j), i))
        else:
            buf = np.empty(shape, jnp.bfloat16)
            for i in range(layers):
                rng = np.random.default_rng([seed_of(key), j, i])
                buf[i] = rng.standard_normal(shape[1:], np.float32) * np.float32(0.02)
            buf = jnp.asarray(buf)
        out[name] = buf
    out["gate"] = out["gate"] * 2.5  # logits of a few units, like a trained router's
    out["bias"] = jax.random.uniform(jax.random.fold_in(key, 7), (layers, experts), jnp.float32, 0, 0.1)
    return out


def seed_of(key) -> int:
    return int(np.asarray(jax.random.key_data(key)).ravel()[-1])


def write_checkpoint(path: Path, weights, amax_in, amax_act) -> int:
    """The W4AFP8 layout, one shard per layer plus act_scales.safetensors. Returns bytes written."""
    layers, experts = weights["gate"].shape[:2]
    inter = SHAPE.intermediate
    quantize = jax.jit(quantize_weights)
    weight_map, total = {}, 0
    act_scales = {}
    for i in range(layers):
        layer = FIRST_MOE_LAYER + i
        tensors = {f"model.layers.{layer}.mlp.gate.weight": np.asarray(weights["gate"][i]),
                   f"model.layers.{layer}.mlp.gate.e_score_correction_bias": np.asarray(weights["bias"][i])}
        q13, q2 = quantize(weights["w13"][i]), quantize(weights["w2"][i])  # amax / 7 per 128 inputs
        p13, s13, p2, s2 = (np.asarray(a) for a in (q13.packed, q13.scales, q2.packed, q2.scales))
        for e in range(experts):
            prefix = f"model.layers.{layer}.mlp.experts.{e}."
            for proj, packed, scales in (("gate", p13[e, :inter], s13[e, :inter]), ("up", p13[e, inter:], s13[e, inter:]),
                                         ("down", p2[e], s2[e])):
                tensors[prefix + f"{proj}_proj.weight"] = packed.view(np.int8)  # the checkpoint's int8
                tensors[prefix + f"{proj}_proj.weight_scale_inv"] = scales
            # Experts no calibration token reached get the layer's largest scales.
            a13 = (amax_in[i, e] if amax_in[i, e] > 0 else amax_in[i].max()) / 448
            a2 = (amax_act[i, e] if amax_act[i, e] > 0 else amax_act[i].max()) / 448
            for gemm, value in (("w1", a13), ("w3", a13), ("w2", a2)):
                act_scales[prefix + f"{gemm}.input_scale"] = np.asarray([value], np.float32)
        name = f"model-{i + 1:05d}-of-{layers:05d}.safetensors"
        save_file(tensors, path / name)
        weight_map.update(dict.fromkeys(tensors, name))
        total += sum(a.nbytes for a in tensors.values())
    save_file(act_scales, path / "act_scales.safetensors")
    weight_map.update(dict.fromkeys(act_scales, "act_scales.safetensors"))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}))
    (path / "hf_quant_config.json").write_text(json.dumps({"quantization": {"quant_algo": "MIXED_PRECISION"}}))
    (path / "config.json").write_text(json.dumps({
        "architectures": ["DeepseekV3ForCausalLM"], "hidden_size": SHAPE.hidden,
        "moe_intermediate_size": SHAPE.intermediate, "n_routed_experts": experts,
        "num_experts_per_tok": SHAPE.top_k, "n_group": SHAPE.n_group, "topk_group": SHAPE.topk_group,
        "routed_scaling_factor": SHAPE.routed_scaling_factor, "first_k_dense_replace": FIRST_MOE_LAYER,
        "num_hidden_layers": FIRST_MOE_LAYER + layers}))
    return total


def main() -> None:
    impl = resolve_implementation()
    on_gpu = impl == "cuda"
    args = parse_args(on_gpu)
    print(f"{args.layers} MoE layers of {SHAPE.name} shapes (E={args.experts}, H={SHAPE.hidden}, "
          f"I={SHAPE.intermediate}, top-{SHAPE.top_k}), batch {args.batch}, implementation={impl}, "
          f"jax {jax.__version__} on {jax.devices()[0].device_kind}")

    key = jax.random.key(args.seed)
    t0 = time.perf_counter()
    weights = make_bf16_weights(key, args.layers, args.experts, on_gpu)
    # Calibration: the bf16 model on 64 tokens; each expert's input scales are amax / 448.
    calib = jax.random.normal(jax.random.fold_in(key, 1), (64, SHAPE.hidden), jnp.float32).astype(jnp.bfloat16)
    bf16_args = (weights["gate"], weights["bias"], weights["w13"], weights["w2"])
    _, amax_in, amax_act = jax.device_get(bf16_stack(calib, *bf16_args))

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.checkpoint_dir or tmp)
        path.mkdir(parents=True, exist_ok=True)
        size = write_checkpoint(path, weights, amax_in, amax_act)
        kept = "" if args.checkpoint_dir else " (a temporary directory, deleted at exit; --checkpoint-dir keeps it)"
        print(f"wrote {size / 1e9:.2f} GB W4AFP8 checkpoint to {path}{kept} in {time.perf_counter() - t0:.1f} s "
              "(weights made, calibrated, quantized)")

        t0 = time.perf_counter()
        experts = load_moe_experts(path)
        ckpt = Checkpoint(path)
        gates = jnp.stack([jnp.asarray(ckpt.tensor(f"model.layers.{l}.mlp.gate.weight")) for l in experts.layers])
        biases = jnp.stack([jnp.asarray(ckpt.tensor(f"model.layers.{l}.mlp.gate.e_score_correction_bias"))
                            for l in experts.layers])
        jax.block_until_ready((experts, gates, biases))
        print(f"loaded layers {list(experts.layers)} in {time.perf_counter() - t0:.1f} s: w13 {experts.w13}, "
              f"a1_scale {[f'{v:.4g}' for v in np.asarray(experts.a1_scale)]}, "
              f"a2_scale {[f'{v:.4g}' for v in np.asarray(experts.a2_scale)]}")

    step = jax.jit(lambda x, g, b, e: w4_stack(x, g, b, e, impl))
    x = jax.random.normal(jax.random.fold_in(key, 2), (args.batch, SHAPE.hidden), jnp.float32).astype(jnp.bfloat16)
    t0 = time.perf_counter()
    jax.block_until_ready(step(x, gates, biases, experts))
    print(f"compiled the decode step in {time.perf_counter() - t0:.1f} s")

    times, errors = [], []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        x_next, xs, ys = jax.block_until_ready(step(x, gates, biases, experts))
        times.append(time.perf_counter() - t0)
        # Each layer's MoE output against the bf16 layer on the same input (the W4AFP8 stack's
        # input to that layer), and the two stacks run apart from the same step input: their
        # layer inputs drift and routing flips compound, so the last figure grows with L.
        got = np.asarray(ys.astype(jnp.float32), np.float64)
        same_input = np.asarray(bf16_layers_on(xs, *bf16_args), np.float64)
        apart = np.asarray(bf16_stack(x, *bf16_args)[0], np.float64)
        per_layer = [np.linalg.norm(g - w) / np.linalg.norm(w) for g, w in zip(got, same_input)]
        drift = np.linalg.norm(got[-1] - apart[-1]) / np.linalg.norm(apart[-1])
        errors.append([np.mean(per_layer), np.max(per_layer), drift])
        x = x_next
    per_step = float(np.median(times))
    print(f"decode step ({args.layers} layers, router included; median of {args.steps}, wall clock): "
          f"{per_step * 1e3:.3f} ms, {per_step / args.layers * 1e3:.3f} ms per layer, "
          f"{args.batch / per_step:.1f} tokens/s")
    errors = np.asarray(errors)
    steps = f"{args.steps} step{'s' if args.steps != 1 else ''}"
    print(f"relative error |out - ref| / |ref| of each layer's MoE output against the bf16 layer given the same "
          f"input (int4 weights, fp8 activations, bf16 output; over {steps}): mean {errors[:, 0].mean():.4f}, "
          f"worst layer {errors[:, 1].max():.4f}")
    print(f"the two stacks started from the same step input drift apart (inputs differ after layer 1, routing "
          f"flips compound; random weights): last layer's MoE outputs differ by {errors[:, 2].mean():.4f}")


if __name__ == "__main__":
    main()
