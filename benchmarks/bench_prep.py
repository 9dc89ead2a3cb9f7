"""Data-prep benchmark: route (step 1) + gather_quantize (step 2), CUDA kernels vs pure JAX.

For M tokens (E = 256 experts, k = 8, H = 7168): the CUDA path (route + gather_quantize,
jitted), each of its two ops alone, the same steps on the reference path jitted on the GPU
(argsort + bincount + scatter), and a device-to-device copy of the bytes the prep must move
(x read once in bf16 + the fp8 rows written) as the floor. Route alone is also timed at
M = 65536 (the multi-block path).

Timing: `timing.time_jax` with chained calls: each op runs n and 2n times inside one jitted
function on different input sets (so the L2 does not serve small cases), chained through
optimization barriers so XLA neither overlaps nor fuses the replicas; the time per op is the
slope between the two, which cancels the fixed dispatch and synchronization cost of a call.
With torch present, torch's copy (do_bench median) is reported too as an independent floor.

usage: python3 benchmarks/bench_prep.py [--json PATH] [--quick]
"""

from __future__ import annotations

import argparse
import functools
import json

import timing  # first: the JAX allocator flag, the import path and the torch guard
import problems as P

import jax
import jax.numpy as jnp
import numpy as np

import w4afp8_jax as w4

SHAPE = P.shape_for(dry_run=False)
E, K, H = SHAPE.experts, SHAPE.top_k, SHAPE.hidden
PREP_M = (1, 16, 64, 512, 8192)
ROUTE_ONLY_M = (65536,)
SCALE = 0.05


def per_op_us(op, inputs, calls, rep_ms):
    """Microseconds per op: slope of chained programs of `calls` and 2 `calls` ops."""
    return timing.time_jax(op, inputs, calls=calls, chain=True, warmup_ms=rep_ms / 4, rep_ms=rep_ms)[0] * 1e6


def torch_copy_us(nbytes):
    if not timing.torch_ok():
        return None
    torch = timing.torch
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy = functools.partial(dst.copy_, src)
    seconds = timing.bench(copy, 25, 200)
    del copy, src, dst
    timing.free_torch()
    return seconds * 1e6


def calls_for(m):
    return 1 if m >= 4096 else 16


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--quick", action="store_true", help="shorter timing")
    args = parser.parse_args()
    rep_ms = 40.0 if args.quick else 150.0
    rng = np.random.default_rng(0)
    print(f"device: {jax.devices()[0].device_kind}; E={E} k={K} H={H}; "
          f"CUDA path: {w4.cuda_unavailable_reason() or 'available'}; timing: {timing.method()}")

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

    def copy_floor_us(nbytes, calls, count):
        words = -(-nbytes // 8)  # a uint32 array read once and written once moves nbytes
        inputs = [(jnp.full((words,), i, jnp.uint32),) for i in range(count)]
        return per_op_us(lambda a: a + jnp.uint32(1), inputs, calls, rep_ms)

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
        calls = calls_for(m)
        nbytes = 2 * m * H + K * m * H + 8 * m * K  # x read, fp8 rows written, ids + positions
        floor = copy_floor_us(nbytes, calls, 2 * calls)
        torch_us = torch_copy_us(nbytes // 2)
        data = [(make_x(m), make_ids(m), scale) for _ in range(2 * calls)]
        for name, impl in (("prep cuda", "cuda"), ("prep reference", "reference")):
            record(name, m, per_op_us(prep(impl), data, calls, rep_ms), floor, torch_us, nbytes)
        positions = [w4.route(ids, E, implementation="reference").positions for _, ids, _ in data]
        record("  gather_quantize cuda", m,
               per_op_us(gather_op, [(x, p, scale) for (x, _, _), p in zip(data, positions)], calls, rep_ms),
               floor, torch_us, nbytes)
        for name, impl in (("  route cuda", "cuda"), ("  route reference", "reference")):
            record(name, m, per_op_us(route_op(impl), [(ids,) for _, ids, _ in data], calls, rep_ms), floor,
                   torch_us, nbytes)
        del data, positions
    for m in ROUTE_ONLY_M:
        nbytes = 8 * m * K
        floor = copy_floor_us(nbytes, 8, 16)
        ids = [(make_ids(m),) for _ in range(16)]
        for name, impl in (("route cuda", "cuda"), ("route reference", "reference")):
            record(name, m, per_op_us(route_op(impl), ids, 8, rep_ms), floor, None, nbytes)

    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=jax.devices()[0].device_kind, method="timing.time_jax, chained calls: " +
                           timing.method(), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
