"""Where one decode layer's time goes: the kernel-only time of every kernel of one DeepSeek-V3
TP4 layer (router + moe, CUDA path, static scales), read by Nsight Compute.

  ncu --clock-control none --metrics gpu__time_duration.sum --csv \\
      python3 benchmarks/ncu_layer.py launch --tokens 1 > $OUT/ncu_layer_b1.csv
  python3 benchmarks/ncu_layer.py report --csv $OUT/ncu_layer_b1.csv

`launch` makes every input first, then calls the jitted layer twice with nothing in between, so
the CSV ends with two identical kernel sequences; `report` takes the last one (the first
compiles and warms up) and prints each kernel's time and their sum. ncu flushes the L2 before
each kernel (cold weights, as in a model whose layers do not fit in the L2). The layer's time in
a model (bench_decode.py) minus this sum is what launches and the gaps between kernels cost.
"""

from __future__ import annotations

import os

os.environ["W4AFP8_BENCH_TORCH"] = "0"  # before timing: no torch in a process ncu profiles

import timing  # noqa: E402 - first: the JAX allocator flag and the import path
import problems as P  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import w4afp8_jax as w4  # noqa: E402

SHAPE = P.shape_for(dry_run=False)


def launch(args) -> None:
    keys = jax.random.split(jax.random.key(args.prng_seed), 6)
    n1, k1 = SHAPE.gemm1()
    n2, k2 = SHAPE.gemm2()
    w13 = P.random_w4_weights(keys[0], SHAPE.experts, n1, k1)
    w2 = P.random_w4_weights(keys[1], SHAPE.experts, n2, k2)
    x = jax.random.normal(keys[2], (args.tokens, SHAPE.hidden), jnp.bfloat16)
    gate = jax.random.normal(keys[3], (SHAPE.hidden, SHAPE.experts), jnp.bfloat16) * 0.01
    bias = jax.random.normal(keys[4], (SHAPE.experts,), jnp.float32) * 0.01

    @jax.jit
    def layer(x, gate, bias, w13, w2):
        topk_weights, topk_ids = w4.deepseek_topk(x @ gate, bias, top_k=SHAPE.top_k, n_group=SHAPE.n_group,
                                                  topk_group=SHAPE.topk_group)
        return w4.moe(x, topk_ids, topk_weights, w13, w2, a1_scale=0.02, a2_scale=0.02,
                      routed_scaling_factor=SHAPE.routed_scaling_factor)

    jax.block_until_ready((x, gate, bias, w13, w2))
    for _ in range(2):
        jax.block_until_ready(layer(x, gate, bias, w13, w2))


def report(args) -> None:
    kernels = timing.ncu_kernel_times(args.csv)
    names = [name for name, _ in kernels]
    per_call = next((k for k in range(len(names) // 2, 0, -1) if names[-2 * k:-k] == names[-k:]), 0)
    if not per_call:
        raise SystemExit(f"{args.csv}: the CSV does not end with two identical kernel sequences")
    measured = kernels[-per_call:]
    total = sum(t for _, t in measured)
    print(f"{per_call} kernels, {total:.1f} us in all (kernel time only)")
    timing.print_kernels(measured)


def main() -> None:
    parser, p, _ = timing.ncu_parser(__doc__)
    p.add_argument("--tokens", type=int, default=1)
    p.add_argument("--prng-seed", type=int, default=0)
    timing.run_ncu_step(parser, launch, report)


if __name__ == "__main__":
    main()
