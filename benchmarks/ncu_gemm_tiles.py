"""Kernel-only times of every grouped-GEMM tile configuration, read by Nsight Compute.

ncu flushes the L2 before each profiled kernel (cold weights, as in serving) and reports the
kernel's own duration, free of dispatch overhead. Two steps:

  ncu --clock-control none --kernel-name regex:GroupedGemm --metrics gpu__time_duration.sum --csv \\
      python3 benchmarks/ncu_gemm_tiles.py launch --order $OUT/order.json [--configs NAME,NAME] > $OUT/ncu.csv
  python3 benchmarks/ncu_gemm_tiles.py report --order $OUT/order.json --csv $OUT/ncu.csv

`launch` runs each (GEMM, B, configuration) twice (the first compiles and warms up), so the
report takes every second kernel. Configurations are named as `w4afp8_jax.grouped_gemm_configs()`
names them and forced through the public `grouped_gemm(..., config=name)`, exact ones at
precision HIGHEST, inexact (fp8 tensor-core) ones at DEFAULT. The kernel-name filter must
match every kernel family's name; check it against the names in the CSV when a family is added. docs/results/gemm_config_sweep_ncu.txt is such a report.
"""

from __future__ import annotations

import json
import os

os.environ["W4AFP8_BENCH_TORCH"] = "0"  # before timing: no torch in a process ncu profiles

import timing  # noqa: E402 - first: the JAX allocator flag and the import path
import problems as P  # noqa: E402

import jax  # noqa: E402

import w4afp8_jax as w4  # noqa: E402

SHAPE = P.shape_for(dry_run=False)
BATCHES = (1, 4, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


def launch(args) -> None:
    if w4.cuda_unavailable_reason() is not None:
        raise SystemExit(f"ncu_gemm_tiles.py launch needs the CUDA path: {w4.cuda_unavailable_reason()}")
    configs = w4.grouped_gemm_configs()
    if args.configs:
        unknown = set(args.configs) - {c.name for c in configs}
        if unknown:
            raise SystemExit(f"--configs: unknown {sorted(unknown)}; choose from {[c.name for c in configs]}")
        configs = [c for c in configs if c.name in args.configs]
    order = []
    key = jax.random.key(args.prng_seed)
    for name, (n, k) in P.gemm_shapes(SHAPE).items():
        weight_sets = [P.random_w4_weights(jax.random.fold_in(key, i), SHAPE.experts, n, k) for i in range(2)]
        for batch in args.batches:
            ids = P.uniform_topk_ids(jax.random.fold_in(key, 100 + batch), batch, SHAPE.experts, SHAPE.top_k)
            offsets = P.group_offsets_of(ids, SHAPE.experts)
            lhs = P.random_fp8(jax.random.fold_in(key, 200 + batch), ids.size, k)
            hit = P.experts_hit(ids, SHAPE.experts)
            for config in configs:
                precision = jax.lax.Precision.HIGHEST if config.exact else jax.lax.Precision.DEFAULT
                fn = jax.jit(lambda a, w, o, c=config.name, p=precision: w4.grouped_gemm(
                    a, 0.02, w, o, precision=p, config=c, implementation="cuda"))
                for weights in weight_sets:  # warm-up launch, then the measured one
                    fn(lhs, weights, offsets).block_until_ready()
                order.append(dict(gemm=name, n=n, k=k, B=batch, rows=int(ids.size), hit=hit, config=config.name,
                                  bytes=hit * P.weight_bytes_per_expert(n, k) + ids.size * (k + 2 * n),
                                  flops=2 * ids.size * n * k))
    with open(args.order, "w") as f:
        json.dump(order, f)


def report(args) -> None:
    order = json.load(open(args.order))
    times = [t for _, t in timing.ncu_kernel_times(args.csv)]
    if len(times) != 2 * len(order):
        raise SystemExit(f"expected {2 * len(order)} kernels in the CSV, found {len(times)}")
    best = {}
    for i, o in enumerate(order):
        t = times[2 * i + 1]
        floor = max(o["bytes"] / args.bandwidth, o["flops"] / args.fp8_rate) * 1e6
        print(f'{o["gemm"]} B={o["B"]:5d} hit={o["hit"]:3d} config={o["config"]:>14s} '
              f'time={t:9.1f} us floor={floor:8.1f} us fraction={floor / t:.2f}')
        case = (o["gemm"], o["B"])
        if case not in best or t < best[case][0]:
            best[case] = (t, o["config"], floor)
    print("best per case:")
    for (gemm, batch), (t, config, floor) in best.items():
        print(f"{gemm} B={batch:5d} config={config:>14s} {t:9.1f} us floor {floor:8.1f} us fraction={floor / t:.2f}")


def main() -> None:
    parser, p, r = timing.ncu_parser(__doc__)
    p.add_argument("--order", required=True, help="JSON listing the launches, for `report`")
    p.add_argument("--configs", type=lambda s: [c.strip() for c in s.split(",") if c.strip()], default=None,
                   help="comma-separated configuration names (default: all of grouped_gemm_configs())")
    p.add_argument("--batches", type=lambda s: [int(b) for b in s.split(",")], default=list(BATCHES))
    p.add_argument("--prng-seed", type=int, default=0)
    r.add_argument("--order", required=True)
    r.add_argument("--bandwidth", type=float, default=4.2e12, help="measured copy bandwidth, bytes/s (H200: 4.2e12)")
    r.add_argument("--fp8-rate", type=float, default=1.43e15, help="measured fp8 rate, flop/s (H200: 1.43e15)")
    timing.run_ncu_step(parser, launch, report)


if __name__ == "__main__":
    main()
