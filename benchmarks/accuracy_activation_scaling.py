"""Accuracy of dynamic per-tensor against dynamic per-token fp8 activation scales (issue 25,
item 2), on the reference path (it defines the numerics; the CPU is enough).

One DeepSeek-V3-like layer, smaller (default E = 32 experts, H = 2048, I = 512, B = 128 tokens,
top-8 of DeepSeek-V3's grouped router, routed_scaling_factor 2.5; random normal * 0.02 weights
rounded to bf16, then int4 with one scale per 128 inputs), run with `moe(...,
activation_scaling=...)` on activations of five kinds:

  gaussian          x ~ N(0, 1)
  outlier tokens    gaussian, 2% of the tokens (at least one) scaled by 100 down to 10 (log-spaced:
                    the largest is always 100x, which sets a per-tensor scale)
  outlier channels  gaussian, 1% of the channels (the same for every token) scaled by 20
  student-t         x ~ Student-t with 3 degrees of freedom (heavy tails in every channel)
  channels + tokens outlier channels and outlier tokens together

Printed per data kind and scaling, against two references with the same routing:
  - the unquantized bf16 layer (bf16 weights, float64 math): rel = |out - ref| / |ref| over the
    batch, and per token |out_t - ref_t| / |ref_t|, its median and worst (max) over the tokens;
  - the same layer with the int4 weights dequantized (float64 math): the error of the fp8
    activations (and the bf16 outputs) alone, as the int4 weights' error (~0.2 on Gaussian
    weights) dominates the first.

  python benchmarks/accuracy_activation_scaling.py [--batch 128] [--experts 32] [--hidden 2048]
                                                  [--intermediate 512] [--seed 0]

About a minute on 2 CPU cores at the defaults (measured 53-87 s).
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

try:
    import w4afp8_jax as w4
except ImportError:  # a source checkout: python benchmarks/accuracy_activation_scaling.py
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    import w4afp8_jax as w4

ROUTED_SCALING_FACTOR = 2.5
SCALINGS = ("per_tensor", "per_token")


def activations(kind: str, rng: np.random.Generator, tokens: int, hidden: int) -> np.ndarray:
    """float32 [tokens, hidden] of one data kind (module docstring)."""
    if kind == "student-t":
        return rng.standard_t(3, (tokens, hidden)).astype(np.float32)
    x = rng.standard_normal((tokens, hidden)).astype(np.float32)
    if kind in ("outlier channels", "channels + tokens"):
        x[:, rng.choice(hidden, max(1, hidden // 100), replace=False)] *= 20.0
    if kind in ("outlier tokens", "channels + tokens"):
        outliers = rng.choice(tokens, max(1, round(0.02 * tokens)), replace=False)
        x[outliers] *= np.geomspace(100.0, 10.0, len(outliers), dtype=np.float32)[:, None]
    return x


DATA = ("gaussian", "outlier tokens", "outlier channels", "student-t", "channels + tokens")


def float64_layer(x, ids, weights, w13, w2):
    """rsf * sum_j weights[t, j] * ffn_{ids[t, j]}(x[t]) in float64, ffn_e(x) = w2_e (silu(gate) * up)
    with w13 [E, 2I, H] (gate rows, then up rows) and w2 [E, H, I] float arrays."""
    x = np.asarray(x, np.float64)
    out = np.zeros_like(x)
    inter = w2.shape[2]
    for e in np.unique(ids):
        tokens, slots = np.nonzero(ids == e)
        gate_up = x[tokens] @ np.asarray(w13[e], np.float64).T
        with np.errstate(over="ignore"):  # exp(-g) of an outlier token's large negative g: silu = -0
            h = gate_up[:, :inter] / (1.0 + np.exp(-gate_up[:, :inter])) * gate_up[:, inter:]
        np.add.at(out, tokens, weights[tokens, slots, None] * (h @ np.asarray(w2[e], np.float64).T))
    return ROUTED_SCALING_FACTOR * out


def errors(out, ref) -> tuple[float, float, float]:
    """(batch relative error, median and worst per-token relative error)."""
    out = np.asarray(out, np.float64)
    per_token = np.linalg.norm(out - ref, axis=1) / np.linalg.norm(ref, axis=1)
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref)), float(np.median(per_token)), float(per_token.max())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=128, help="tokens B")
    p.add_argument("--experts", type=int, default=32, help="experts E, a multiple of 8, at least 16")
    p.add_argument("--hidden", type=int, default=2048, help="H, a multiple of 128")
    p.add_argument("--intermediate", type=int, default=512, help="I, a multiple of 128")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    e, h, inter, b = args.experts, args.hidden, args.intermediate, args.batch
    rng = np.random.default_rng(args.seed)
    print(f"E={e}, H={h}, I={inter}, B={b}, top-8, seed {args.seed}, reference path, jax {jax.__version__}")

    bf16 = [jnp.asarray(rng.standard_normal(shape, np.float32) * np.float32(0.02), jnp.bfloat16)
            for shape in ((e, 2 * inter, h), (e, h, inter))]
    quantized = [w4.quantize_weights(w) for w in bf16]
    dequantized = [np.asarray(w.dequantize()) for w in quantized]
    bf16 = [np.asarray(w.astype(jnp.float32)) for w in bf16]
    logits = jnp.asarray(rng.standard_normal((b, e)), jnp.float32)
    topk_weights, topk_ids = w4.deepseek_topk(logits, jnp.asarray(rng.standard_normal(e) * 0.1, jnp.float32))
    ids, weights = np.asarray(topk_ids), np.asarray(topk_weights, np.float64)

    layers = {s: jax.jit(lambda x, s=s: w4.moe(x, topk_ids, topk_weights, *quantized, activation_scaling=s,
                                               routed_scaling_factor=ROUTED_SCALING_FACTOR,
                                               implementation="reference"))
              for s in SCALINGS}
    rows = []
    for kind in DATA:
        x = jnp.asarray(activations(kind, rng, b, h), jnp.bfloat16)
        x64 = np.asarray(x.astype(jnp.float32))
        want_bf16 = float64_layer(x64, ids, weights, *bf16)
        want_int4 = float64_layer(x64, ids, weights, *dequantized)
        for scaling in SCALINGS:
            out = np.asarray(layers[scaling](x).astype(jnp.float32))
            rows.append((kind, scaling, *errors(out, want_bf16), *errors(out, want_int4)))
            print(".", end="", flush=True)

    print("\n\nrelative error of the W4AFP8 layer with dynamic activation scales (a markdown table): against the "
          "bf16 layer, and against the layer with the dequantized int4 weights (the fp8 activations' share)")
    print("| data | scaling | vs bf16: batch | median token | worst token | fp8 only: batch | median token | worst token |")
    print("|---|---|" + "---:|" * 6)
    for kind, scaling, *values in rows:
        print(f"| {kind} | {scaling} | " + " | ".join(f"{v:.4f}" for v in values) + " |")

if __name__ == "__main__":
    main()
