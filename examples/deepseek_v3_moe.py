"""A DeepSeek-V3 MoE layer (tensor-parallel-4 shapes) in W4AFP8 with w4afp8_jax.

Builds E=256 experts of hidden size H=7168 and intermediate size I=512 from random bf16
weights (normal * 0.02), quantizes them to int4 with one scale per 128 inputs
(`quantize_weights`), routes a batch with DeepSeek-V3's grouped top-8 router
(`deepseek_topk` on random logits + a per-expert bias) and runs the layer (`moe`, with
static fp8 activation scales and routed_scaling_factor 2.5) under `jax.jit`. It prints the
layer's relative error against the unquantized bf16 layer (same routing, f32 math), against
the pure-JAX reference path when it ran on the GPU, and its time.

  python examples/deepseek_v3_moe.py [--batch 64] [--experts 256] [--implementation auto]
                                     [--precision default|highest]

Without a GPU (or without the compiled CUDA module) it runs the reference path; at the
default batch of 4 that takes one to two minutes on 2 CPU cores, most of it making the weights.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

try:
    import w4afp8_jax
except ImportError:  # a source checkout: python examples/deepseek_v3_moe.py
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    import w4afp8_jax

from w4afp8_jax import W4Weights, deepseek_topk, moe, quantize_weights

HIDDEN, INTER, TOP_K, ROUTED_SCALING_FACTOR = 7168, 512, 8, 2.5
N_GROUP, TOPK_GROUP = 8, 4


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=None, help="tokens (default: 64 on the GPU path, 4 otherwise)")
    p.add_argument("--experts", type=int, default=256, help="number of experts, a multiple of 8, at least 16")
    p.add_argument("--implementation", choices=("auto", "cuda", "reference"), default="auto")
    p.add_argument("--repeats", type=int, default=None, help="timed calls (default: 20 on the GPU path, 3 otherwise)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", choices=("default", "highest"), default="default",
                   help="moe(..., precision=...): default lets prefill-sized GEMMs use Hopper's fp8 tensor-core "
                        "accumulation; highest keeps the exact f32 group sums")
    args = p.parse_args()
    if args.experts < 16 or args.experts % N_GROUP:
        p.error(f"--experts must be a multiple of {N_GROUP} and at least 16 (the router keeps "
                f"{TOPK_GROUP} of {N_GROUP} groups and picks {TOP_K} experts in them)")
    return args



class ExpertWeights:
    """Random weights (normal * 0.02, rounded to bf16), each expert reproducible from (seed,
    matrix, expert): made on the device with jax.random on a GPU, with numpy on the CPU, where
    jax's counter-based generator is several times slower."""

    def __init__(self, seed: int, on_gpu: bool):
        self.seed, self.on_gpu = seed, on_gpu
        self._jax_chunk = jax.jit(self._jax_experts, static_argnums=(1, 2, 3))

    def _jax_experts(self, experts, matrix, n, k):
        key = jax.random.fold_in(jax.random.key(self.seed), matrix)
        one = lambda e: jax.random.normal(jax.random.fold_in(key, e), (n, k), jnp.float32)  # noqa: E731
        return jax.vmap(one)(experts) * 0.02

    def chunk(self, matrix: int, experts: np.ndarray, n: int, k: int):
        """float32 [len(experts), n, k] (a device array on the GPU, a numpy array otherwise)."""
        if self.on_gpu:
            return self._jax_chunk(jnp.asarray(experts, jnp.int32), matrix, n, k)
        out = np.empty((len(experts), n, k), np.float32)
        for i, e in enumerate(experts):
            np.random.default_rng([self.seed, matrix, int(e)]).standard_normal(out=out[i], dtype=np.float32)
        out *= np.float32(0.02)
        return out


@jax.jit
def to_bf16_and_quantize(w):
    w = jnp.asarray(w).astype(jnp.bfloat16)
    return w, quantize_weights(w)


def build_layer(gen: ExpertWeights, num_experts: int, hit: np.ndarray, chunk: int):
    """Quantized w13 [E, 2I, H] and w2 [E, H, I], made expert chunk by chunk (bounded memory),
    and the bf16 weights of the experts in `hit` (for the unquantized reference)."""
    packed, scales, kept = ([[], []] for _ in range(3))
    for start in range(0, num_experts, chunk):
        experts = np.arange(start, min(start + chunk, num_experts))
        mine = np.flatnonzero(np.isin(experts, hit))
        for matrix, (n, k) in enumerate(((2 * INTER, HIDDEN), (HIDDEN, INTER))):
            w_bf16, q = to_bf16_and_quantize(gen.chunk(matrix, experts, n, k))
            packed[matrix].append(q.packed)
            scales[matrix].append(q.scales)
            if mine.size:
                kept[matrix].append(w_bf16[mine])
    # prepare(): the tiled byte order the CUDA kernels stream fastest (same math).
    w13, w2 = (W4Weights(jnp.concatenate(packed[m]), jnp.concatenate(scales[m])).prepare() for m in (0, 1))
    return w13, w2, jnp.concatenate(kept[0]), jnp.concatenate(kept[1])


@jax.jit
def unquantized_layer(x, coef, w13_hit, w2_hit):
    """f32 math with the bf16 weights of the experts hit: out = 2.5 * sum_e coef[:, e] *
    ffn_e(x), where coef[t, e] is token t's routing weight for expert e (0 if not routed).
    Also returns amax |silu(gate) * up| over the routed (token, expert) pairs (a2 calibration)."""
    hp = jax.lax.Precision.HIGHEST
    xf = x.astype(jnp.float32)

    def one_expert(carry, inputs):
        out, amax = carry
        c, w13, w2 = inputs
        gate_up = jnp.dot(xf, w13.astype(jnp.float32).T, precision=hp)
        h = jax.nn.silu(gate_up[:, :INTER]) * gate_up[:, INTER:]
        y = jnp.dot(h, w2.astype(jnp.float32).T, precision=hp)
        amax = jnp.maximum(amax, jnp.max(jnp.where(c[:, None] > 0, jnp.abs(h), 0.0)))
        return (out + c[:, None] * y, amax), None

    init = (jnp.zeros(x.shape, jnp.float32), jnp.zeros((), jnp.float32))
    (out, amax), _ = jax.lax.scan(one_expert, init, (coef.T, w13_hit, w2_hit))
    return out * ROUTED_SCALING_FACTOR, amax


def relative_error(a, b) -> float:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def main() -> None:
    args = parse_args()
    try:
        impl = w4afp8_jax.resolve_implementation(args.implementation)
    except RuntimeError as e:  # "cuda" asked for where it cannot run: say why
        sys.exit(str(e))
    on_gpu = jax.default_backend() == "gpu"
    batch = args.batch or (64 if impl == "cuda" else 4)
    repeats = args.repeats or (20 if impl == "cuda" else 3)
    num_experts = args.experts
    print(f"DeepSeek-V3 TP4 MoE layer: E={num_experts}, H={HIDDEN}, I={INTER}, top-{TOP_K}, "
          f"batch {batch}, implementation={impl}, jax {jax.__version__} on {jax.devices()[0].device_kind}")

    # The router: sigmoid scores of the gate logits, grouped top-8 with a per-expert bias.
    k_x, k_logits, k_bias = jax.random.split(jax.random.key(args.seed + 1), 3)
    x = jax.random.normal(k_x, (batch, HIDDEN), jnp.float32).astype(jnp.bfloat16)
    logits = jax.random.normal(k_logits, (batch, num_experts), jnp.float32)
    bias = jax.random.normal(k_bias, (num_experts,), jnp.float32) * 0.1
    topk_weights, topk_ids = jax.jit(deepseek_topk)(logits, bias)
    hit = np.unique(np.asarray(topk_ids))

    t0 = time.perf_counter()
    gen = ExpertWeights(args.seed, on_gpu)
    w13, w2, w13_hit, w2_hit = build_layer(gen, num_experts, hit, chunk=32 if on_gpu else 16)
    jax.block_until_ready((w13, w2))
    int4_bytes = sum(a.nbytes for w in (w13, w2) for a in (w.packed, w.scales))
    print(f"made and quantized the weights in {time.perf_counter() - t0:.1f} s: {int4_bytes / 1e9:.2f} GB "
          f"int4 + f32 scales (bf16 would be {num_experts * 3 * INTER * HIDDEN * 2 / 1e9:.2f} GB)")

    # The unquantized layer on the experts hit; it also calibrates the static activation scales
    # the way a checkpoint's input_scale is made: amax / 448 of each GEMM's input.
    coef = jnp.zeros((batch, num_experts), jnp.float32).at[jnp.arange(batch)[:, None], topk_ids].add(topk_weights)
    reference, h_amax = unquantized_layer(x, coef[:, hit], w13_hit, w2_hit)
    a1_scale = float(jnp.max(jnp.abs(x.astype(jnp.float32)))) / 448.0
    a2_scale = float(h_amax) / 448.0
    del w13_hit, w2_hit

    precision = jax.lax.Precision(args.precision)

    def layer(x, logits, bias, w13, w2, implementation=impl):
        weights, ids = deepseek_topk(logits, bias, implementation=implementation)
        return moe(x, ids, weights, w13, w2, a1_scale=a1_scale, a2_scale=a2_scale,
                   routed_scaling_factor=ROUTED_SCALING_FACTOR, precision=precision,
                   implementation=implementation)

    run = jax.jit(layer)
    out = jax.block_until_ready(run(x, logits, bias, w13, w2))
    print(f"{len(hit)} of {num_experts} experts hit; static scales a1 = {a1_scale:.4g}, a2 = {a2_scale:.4g}")
    print(f"relative error vs the unquantized bf16 layer: {relative_error(out, reference):.4f} "
          "(int4 weights, fp8 activations, bf16 output; about 0.21 is what symmetric int4 rounding "
          "costs on Gaussian weights, docs/numerics.md)")
    if impl == "cuda":
        # The reference path defines the numerics on the CPU (XLA's fused f32 division and exp
        # on the GPU are not correctly rounded, which moves some fp8 codes); with static scales
        # tokens are independent, so a few tokens suffice.
        few = min(batch, 4)
        cpu_inputs = jax.device_put((x[:few], logits[:few], bias, w13, w2), jax.devices("cpu")[0])
        ref_path = jax.jit(lambda *a: layer(*a, implementation="reference"))(*cpu_inputs)
        print(f"relative error vs the reference path on the CPU (same quantized math, first {few} tokens): "
              f"{relative_error(out[:few], jax.device_put(ref_path, out.devices().pop())):.2e}")

    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(run(x, logits, bias, w13, w2))
        times.append(time.perf_counter() - t0)
    print(f"time per jitted layer call (router included, median of {repeats}, wall clock): "
          f"{np.median(times) * 1e3:.3f} ms")


if __name__ == "__main__":
    main()
