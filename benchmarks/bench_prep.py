"""Data-prep benchmark: route (step 1) + gather_quantize (step 2), CUDA kernels vs pure JAX.

For M tokens (E = 256 experts, k = 8, H = 7168): the CUDA path (route + gather_quantize,
jitted), each of its two ops alone, the same steps on the reference path jitted on the GPU
(argsort + bincount + scatter), and a device-to-device copy of the bytes the prep must move
(x read once in bf16 + the fp8 rows written) as the floor. Route alone is also timed at
M = 65536 (the multi-block path).

Timing: every op runs R times inside one jitted function on R different input sets (so the
L2 does not serve small cases), chained through optimization barriers so XLA neither overlaps
nor fuses the replicas; the median wall time of a call is taken for two replica counts R1 < R2
and the time per op is the slope (t(R2) - t(R1)) / (R2 - R1), which cancels the fixed dispatch
and synchronization cost of a call. With torch present, torch's copy (triton do_bench median)
is reported too as an independent floor.

usage: python benchmarks/bench_prep.py [--json PATH] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch times the copy floor on the same GPU

import jax
import jax.numpy as jnp
import numpy as np

import w4afp8_jax as w4

E, K, H = 256, 8, 7168
PREP_M = (1, 16, 64, 512, 8192)
ROUTE_ONLY_M = (65536,)
SCALE = 0.05


def chained(op):
    """fn(list of input tuples) -> list of outputs, op applied to each in turn, each replica
    waiting for the previous one's outputs (no overlap, no cross-replica fusion)."""
    def run(inputs):
        outs, prev = [], None
        for args in inputs:
            if prev is not None:
                prev, args = jax.lax.optimization_barrier((prev, args))
            prev = op(*args)
            outs.append(prev)
        return outs
    return jax.jit(run)


def call_seconds(fn, inputs, reps):
    jax.block_until_ready(fn(inputs))  # compile + warm up
    jax.block_until_ready(fn(inputs))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(inputs))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def per_op_us(op, make_inputs, r1, r2, reps):
    fn = chained(op)
    inputs = [make_inputs(i) for i in range(r2)]
    t1 = call_seconds(fn, inputs[:r1], reps)
    t2 = call_seconds(fn, inputs, reps)
    return max(t2 - t1, 0.0) / (r2 - r1) * 1e6


def torch_copy_us(nbytes):
    try:
        import torch
        from triton.testing import do_bench
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    del src, dst
    torch.cuda.empty_cache()
    return ms * 1e3


def replicas(m):
    return (1, 3) if m >= 4096 else (4, 36)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    args = parser.parse_args()
    reps = 5 if args.quick else 25
    rng = np.random.default_rng(0)
    print(f"device: {jax.devices()[0].device_kind}; E={E} k={K} H={H}; "
          f"CUDA path: {w4.cuda_unavailable_reason() or 'available'}")

    def make_ids(m):
        if m > 8192:  # distinct experts per token costs too much host time here; duplicates do not matter
            return jnp.asarray(rng.integers(0, E, size=(m, K), dtype=np.int32))
        return jnp.asarray(np.argsort(rng.random((m, E)), axis=1)[:, :K].astype(np.int32))

    def make_x(m):
        return jnp.asarray(rng.standard_normal((m, H)).astype(np.float32), jnp.bfloat16)

    def prep(impl):
        def op(x, ids, scale):
            r = w4.route(ids, E, implementation=impl)
            q, _ = w4.gather_quantize(x, r.positions, scale, implementation=impl)
            return q, r.group_offsets
        return op

    def route_op(impl):
        return lambda ids: tuple(w4.route(ids, E, implementation=impl))

    def gather_op(x, positions, scale):
        return w4.gather_quantize(x, positions, scale, implementation="cuda")[0]

    rows = []

    def record(op, m, us, floor_us, torch_us, nbytes):
        ratio = us / floor_us if floor_us else float("nan")
        rows.append(dict(op=op.strip(), M=m, E=E, k=K, H=H, time_us=round(us, 2), copy_floor_us=round(floor_us, 2),
                         torch_copy_us=None if torch_us is None else round(torch_us, 2), ratio=round(ratio, 3),
                         bytes_moved=nbytes))
        torch_s = "" if torch_us is None else f"{torch_us:10.1f}"
        print(f"{op:24s} {m:6d} {us:10.1f} {floor_us:10.1f} {ratio:7.2f} {torch_s}", flush=True)

    print(f"{'op':24s} {'M':>6s} {'time us':>10s} {'copy us':>10s} {'ratio':>7s} {'torch copy us':>10s}")
    scale = jnp.float32(SCALE)
    for m in PREP_M:
        r1, r2 = replicas(m)
        nbytes = 2 * m * H + K * m * H + 8 * m * K  # x read, fp8 rows written, ids + positions
        words = -(-nbytes // 8)  # a uint32 array read once and written once moves nbytes
        floor = per_op_us(lambda a: a + jnp.uint32(1), lambda i: (jnp.full((words,), i, jnp.uint32),), r1, r2, reps)
        torch_us = torch_copy_us(nbytes // 2)
        data = [(make_x(m), make_ids(m), scale) for _ in range(r2)]
        for name, impl in (("prep cuda", "cuda"), ("prep reference", "reference")):
            record(name, m, per_op_us(prep(impl), lambda i: data[i], r1, r2, reps), floor, torch_us, nbytes)
        positions = [w4.route(ids, E, implementation="reference").positions for _, ids, _ in data]
        record("  gather_quantize cuda", m,
               per_op_us(gather_op, lambda i: (data[i][0], positions[i], scale), r1, r2, reps), floor, torch_us, nbytes)
        record("  route cuda", m, per_op_us(route_op("cuda"), lambda i: (data[i][1],), r1, r2, reps), floor, torch_us,
               nbytes)
        record("  route reference", m, per_op_us(route_op("reference"), lambda i: (data[i][1],), r1, r2, reps), floor,
               torch_us, nbytes)
        del data, positions
    for m in ROUTE_ONLY_M:
        nbytes = 8 * m * K
        words = -(-nbytes // 8)
        floor = per_op_us(lambda a: a + jnp.uint32(1), lambda i: (jnp.full((words,), i, jnp.uint32),), 4, 20, reps)
        ids = [make_ids(m) for _ in range(20)]
        for name, impl in (("route cuda", "cuda"), ("route reference", "reference")):
            record(name, m, per_op_us(route_op(impl), lambda i: (ids[i],), 4, 20, reps), floor, None, nbytes)

    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=jax.devices()[0].device_kind, method="slope of chained jitted replicas, wall-clock "
                           "medians", rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
