"""Kernel-only times of every grouped-GEMM tile configuration, read by Nsight Compute.

ncu flushes the L2 before each profiled kernel (cold weights, as in serving) and reports the
kernel's own duration, free of dispatch overhead. Two steps:

  ncu --clock-control none --kernel-name regex:GroupedGemm --metrics gpu__time_duration.sum --csv \\
      python3 benchmarks/ncu_gemm_tiles.py launch --order $OUT/order.json [--configs 1,3,10] > $OUT/ncu.csv
  python3 benchmarks/ncu_gemm_tiles.py report --order $OUT/order.json --csv $OUT/ncu.csv

`launch` runs each (GEMM, B, config) twice (the first compiles and warms up), so the report
takes every second kernel. docs/results/gemm_config_sweep_ncu.txt is such a report.
"""

from __future__ import annotations

import argparse
import json
import os

os.environ["W4AFP8_BENCH_TORCH"] = "0"  # before common: no torch in a process ncu profiles

import jax
import jax.numpy as jnp
import numpy as np

from common import (BATCHES, HIDDEN, INTER, NUM_EXPERTS, experts_hit, group_offsets_of, ncu_kernel_times,
                    random_w4_weights, uniform_topk_ids)

GEMMS = {"gemm1": (2 * INTER, HIDDEN), "gemm2": (HIDDEN, INTER)}  # (N, K)


def launch(args) -> None:
    import w4afp8_jax as w4
    from w4afp8_jax._backend import _w4afp8_cuda
    from w4afp8_jax.ops.grouped_gemm import _grouped_gemm_cuda

    w4._backend.resolve("cuda")
    configs = args.configs or list(range(_w4afp8_cuda.grouped_gemm_num_configs()))
    order = []
    key = jax.random.PRNGKey(args.seed)
    for name, (n, k) in GEMMS.items():
        weight_sets = [random_w4_weights(jax.random.fold_in(key, i), NUM_EXPERTS, n, k) for i in range(2)]
        for batch in args.batches:
            ids = uniform_topk_ids(jax.random.fold_in(key, 100 + batch), batch)
            offsets = group_offsets_of(ids, NUM_EXPERTS)
            x = jax.random.normal(jax.random.fold_in(key, 200 + batch), (ids.size, k), jnp.float32)
            lhs, scale = w4.quantize_fp8(x)
            hit = experts_hit(np.asarray(ids), NUM_EXPERTS)
            for config in configs:
                fn = jax.jit(lambda a, s, w, o, c=config: _grouped_gemm_cuda(a, s, w, o, c))
                for weights in weight_sets:  # warm-up launch, then the measured one
                    fn(lhs, scale, weights, offsets).block_until_ready()
                order.append(dict(gemm=name, n=n, k=k, B=batch, rows=int(ids.size), hit=hit, config=config,
                                  bytes=hit * n * (k // 2 + k // 128 * 4) + ids.size * (k + 2 * n),
                                  flops=2 * ids.size * n * k))
    with open(args.order, "w") as f:
        json.dump(order, f)


def report(args) -> None:
    order = json.load(open(args.order))
    times = [t for _, t in ncu_kernel_times(args.csv)]
    if len(times) != 2 * len(order):
        raise SystemExit(f"expected {2 * len(order)} kernels in the CSV, found {len(times)}")
    best = {}
    for i, o in enumerate(order):
        t = times[2 * i + 1]
        floor = max(o["bytes"] / args.bandwidth, o["flops"] / args.fp8_rate) * 1e6
        print(f'{o["gemm"]} B={o["B"]:5d} hit={o["hit"]:3d} config={o["config"]:2d} '
              f'time={t:9.1f} us floor={floor:8.1f} us fraction={floor / t:.2f}')
        case = (o["gemm"], o["B"])
        if case not in best or t < best[case][0]:
            best[case] = (t, o["config"], floor)
    print("best per case:")
    for (gemm, batch), (t, config, floor) in best.items():
        print(f"{gemm} B={batch:5d} config={config:2d} {t:9.1f} us floor {floor:8.1f} us fraction={floor / t:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="step", required=True)
    p = sub.add_parser("launch")
    p.add_argument("--order", required=True, help="JSON listing the launches, for `report`")
    p.add_argument("--configs", type=lambda s: [int(c) for c in s.split(",")], default=None)
    p.add_argument("--batches", type=lambda s: [int(b) for b in s.split(",")], default=list(BATCHES))
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("report")
    p.add_argument("--order", required=True)
    p.add_argument("--csv", required=True, help="ncu --csv output")
    p.add_argument("--bandwidth", type=float, default=3.0e12, help="measured copy bandwidth, bytes/s")
    p.add_argument("--fp8-rate", type=float, default=1.36e15, help="measured fp8 rate, flop/s")
    args = parser.parse_args()
    launch(args) if args.step == "launch" else report(args)


if __name__ == "__main__":
    main()
