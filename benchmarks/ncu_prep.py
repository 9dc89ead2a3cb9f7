"""Kernel-only times of the data prep (route + gather_quantize, CUDA path), read by Nsight Compute.

For M tokens (E = 256, k = 8, H = 7168) one jitted function runs route then gather_quantize with
a static scale, as bench_prep.py's "prep cuda" does. ncu flushes the L2 before each kernel and
reports each kernel's own duration, so the sum over the prep's kernels excludes launch gaps and
dispatch overhead; the floor is a copy of the bytes the prep must move (x read in bf16 + the
fp8 rows written) at --bandwidth. Two steps:

  ncu --clock-control none --metrics gpu__time_duration.sum --csv \\
      python3 benchmarks/ncu_prep.py launch --order $OUT/prep_order.json [--tokens 1,64] > $OUT/ncu_prep.csv
  python3 benchmarks/ncu_prep.py report --order $OUT/prep_order.json --csv $OUT/ncu_prep.csv

ncu profiles every kernel (no --kernel-name filter), because which kernels the prep launches
(ours, or XLA's around them) is what is measured. `launch` runs the prep twice per M on
different random inputs (the first compiles and warms up) and brackets the second call with a
marker: a jitted `combine` on a one-token input, whose only kernel is CombineKernel, which the
prep never launches. `report` takes the kernels between each pair of markers. Markers rather
than NVTX ranges: XLA may launch kernels from its own threads, outside a range pushed on the
Python thread. Memsets and copies are not kernels and are not counted.
"""

from __future__ import annotations

import json
import os

os.environ["W4AFP8_BENCH_TORCH"] = "0"  # before timing: no torch in a process ncu profiles

import timing  # noqa: E402 - first: the JAX allocator flag and the import path
import problems as P  # noqa: E402
from bench_prep import PREP_M, SCALE  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import w4afp8_jax as w4  # noqa: E402

SHAPE = P.shape_for(dry_run=False)
MARKER_KERNEL = "CombineKernel"


def launch(args) -> None:
    impl = args.implementation

    def prep(x, topk_ids, scale):
        routing = w4.route(topk_ids, SHAPE.experts, implementation=impl)
        rows, _ = w4.gather_quantize(x, routing.positions, scale, implementation=impl)
        return rows, routing.group_offsets

    prep = jax.jit(prep)
    combine = jax.jit(lambda rows, positions, weights: w4.combine(rows, positions, weights, implementation=impl))
    # Made once, up front: creating them may launch kernels, which must not fall between markers.
    marker_inputs = (jnp.zeros((1, 8), jnp.bfloat16), jnp.zeros((1, 1), jnp.int32), jnp.ones((1, 1), jnp.float32))
    scale = jnp.float32(SCALE)

    def mark():
        jax.block_until_ready(combine(*marker_inputs))

    key = jax.random.key(args.prng_seed)
    order = []
    for m in args.tokens:
        keys = jax.random.split(jax.random.fold_in(key, m), 4)
        inputs = [(jax.random.normal(keys[2 * i], (m, SHAPE.hidden), jnp.bfloat16),
                   P.uniform_topk_ids(keys[2 * i + 1], m, SHAPE.experts, SHAPE.top_k), scale) for i in range(2)]
        jax.block_until_ready(inputs)
        jax.block_until_ready(prep(*inputs[0]))  # compiles and warms up
        mark()
        jax.block_until_ready(prep(*inputs[1]))  # the measured call
        mark()
        order.append(dict(M=m, E=SHAPE.experts, k=SHAPE.top_k, H=SHAPE.hidden,
                          bytes=m * SHAPE.hidden * 2 + m * SHAPE.top_k * SHAPE.hidden))
    with open(args.order, "w") as f:
        json.dump(order, f)


def report(args) -> None:
    order = json.load(open(args.order))
    kernels = timing.ncu_kernel_times(args.csv)
    marks = [i for i, (name, _) in enumerate(kernels) if MARKER_KERNEL in name]
    if len(marks) != 2 * len(order):
        raise SystemExit(f"expected {2 * len(order)} {MARKER_KERNEL} markers among the {len(kernels)} kernels "
                         f"in the CSV, found {len(marks)}")
    for o, start, end in zip(order, marks[::2], marks[1::2]):
        measured = kernels[start + 1:end]
        total = sum(t for _, t in measured)
        floor = o["bytes"] / args.bandwidth * 1e6
        print(f'M={o["M"]:5d}: {len(measured)} kernels, {total:9.1f} us; copy floor {floor:8.2f} us '
              f'({o["bytes"] / 1e6:.1f} MB); time / floor = {total / floor:.2f}')
        timing.print_kernels(measured)


def main() -> None:
    parser, p, r = timing.ncu_parser(__doc__)
    p.add_argument("--order", required=True, help="JSON listing the measured calls, for `report`")
    p.add_argument("--tokens", type=lambda s: [int(m) for m in s.split(",")], default=list(PREP_M),
                   help="comma-separated token counts M (default: %s)" % ",".join(map(str, PREP_M)))
    p.add_argument("--implementation", choices=("cuda", "reference"), default="cuda",
                   help="reference: the same steps without the CUDA module, to check the script off the GPU "
                        "(its output has no markers for `report`)")
    p.add_argument("--prng-seed", type=int, default=0)
    r.add_argument("--order", required=True)
    r.add_argument("--bandwidth", type=float, default=4.2e12, help="measured copy bandwidth, bytes/s (H200: 4.2e12)")
    timing.run_ncu_step(parser, launch, report)


if __name__ == "__main__":
    main()
