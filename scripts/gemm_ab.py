"""A/B timing of two builds of the grouped GEMM (e.g. before and after a refactor), one process
per build so both can register the same FFI target names.

    PYTHONPATH=<build A's package root> python3 scripts/gemm_ab.py --label A --json a.json
    PYTHONPATH=<build B's package root> python3 scripts/gemm_ab.py --label B --json b.json
    python3 scripts/gemm_ab.py --compare a.json b.json

With --once each point launches its kernel twice (warm-up, measured) for Nsight Compute
(--ncu attaches the kernel-only times). Otherwise each point is the slope time of a jitted lax.scan over S rotating weight sets (so the 60 MB L2
cannot serve the weights): (t(2n calls) - t(n calls)) / n, median of repeats. The same seeds
give both builds the same problems. With --check, every timed configuration is also compared
with the reference path on the CPU (relative Frobenius error).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

SHAPES = {"gemm1": (1024, 7168), "gemm2": (7168, 512)}  # (N, K) at DeepSeek-V3 TP4
TOP_K = 8
# Per batch, the configurations timed: the heuristic's choices and the decode candidates.
PLAN = {
    1: ["register_16x8_k4_s4", "register_64x8_k1_s4", "register_16x8_k8_s3", "stream_32x8_s6", "stream_16x8_s8"],
    4: ["stream_32x8_s6", "stream_32x16_s4", "stream_16x8_s8", "register_64x8_k1_s4", "register_16x8_k4_s4"],
    512: ["stream_32x16_s4", "register_128x32_k1_s2"],
    2048: ["register_128x32_k1_s2", "wgmma_128x128_s4"],
    8192: ["wgmma_128x128_s4"],
}
PLAN[16] = PLAN[64] = PLAN[4]
# The heuristic's choices only (GroupedGemmDefaultConfig at DeepSeek-V3 TP4 shapes).
HEURISTIC = {1: ["register_16x8_k4_s4", "register_64x8_k1_s4"], 4: ["stream_32x8_s6"], 512: ["stream_32x16_s4"],
             2048: ["register_128x32_k1_s2", "wgmma_128x128_s4"], 8192: ["wgmma_128x128_s4"]}
HEURISTIC[16] = HEURISTIC[64] = HEURISTIC[4]
# The index of each name in the table before the refactor (536cc44), where configs were numbers.
OLD_INDEX = {"register_32x8_k4_s4": 0, "register_16x8_k4_s4": 1, "register_64x8_k2_s4": 2,
             "register_64x8_k1_s4": 3, "register_64x16_k2_s3": 4, "register_64x16_k4_s2": 5,
             "register_128x32_k1_s2": 6, "stream_16x8_s8": 8, "stream_16x8_s12": 9, "stream_32x8_s6": 10,
             "stream_16x16_s6": 11, "stream_32x16_s4": 12, "register_16x8_k8_s3": 13,
             "register_16x8_k4_s6": 14, "wgmma_128x128_s4": 15}


def run(args):
    import jax
    import jax.numpy as jnp
    import w4afp8_jax as w4

    new_api = hasattr(w4, "grouped_gemm_configs")
    experts = args.experts
    from w4afp8_jax import _backend
    _backend.resolve("cuda" if args.cuda else "auto")  # registers the FFI targets

    def gemm_fn(config):
        if new_api:
            precision = None if config.startswith("wgmma") else jax.lax.Precision.HIGHEST
            return lambda q, s, w, o: w4.grouped_gemm(q, s, w, o, precision=precision, config=config)
        from w4afp8_jax.gemm import _grouped_gemm_cuda
        return lambda q, s, w, o: _grouped_gemm_cuda(q, s, w, o, config=OLD_INDEX[config],
                                                     fast_accumulation=config.startswith("wgmma"))

    results = []
    for shape_name, (n, k) in SHAPES.items():
        rng = np.random.default_rng(0)
        sets = args.sets
        # One set at a time: random.bits draws 32-bit words before narrowing to bytes.
        packed = jnp.stack([jax.random.bits(jax.random.key(s), (experts, n, k // 2), jnp.uint8) for s in range(sets)])
        scales = jnp.asarray(rng.uniform(0.5, 1.5, (sets, experts, n, k // 128)) * 0.005, jnp.float32)
        for batch in args.batches:
            rows = batch * TOP_K
            ids = np.stack([rng.choice(experts, TOP_K, replace=False) for _ in range(batch)])
            counts = np.bincount(ids.reshape(-1), minlength=experts)
            offsets = jnp.asarray(np.concatenate([[0], np.cumsum(counts)]), jnp.int32)
            lhs = jnp.asarray(rng.standard_normal((rows, k)) * 50, jnp.float32).astype(jnp.float8_e4m3fn)
            scale = jnp.float32(0.01)
            plan = HEURISTIC if args.plan == "heuristic" else PLAN
            for config in args.configs or plan.get(batch, []):
                if config.startswith("wgmma") and rows // experts < 16:
                    continue
                fn = gemm_fn(config)

                def many(packed, scales, lhs, offsets, calls, fn=fn):
                    def body(acc, i):
                        if hasattr(w4.W4Weights, "layer"):  # read in place (no copy of the set)
                            w = w4.W4Weights(packed, scales, layout="tiled").layer(i % sets)
                        else:  # builds before layer(): XLA copies the slice each step
                            w = w4.W4Weights(packed[i % sets], scales[i % sets], layout="tiled")
                        out = fn(lhs, scale, w, offsets)
                        return acc + out[0, 0].astype(jnp.float32), None
                    return jax.lax.scan(body, jnp.float32(0), jnp.arange(calls))[0]

                if args.once:  # for Nsight Compute: one warm-up and one measured launch per point
                    w = w4.W4Weights(packed[0], scales[0], layout="tiled")
                    g = jax.jit(fn)
                    for _ in range(2):
                        g(lhs, scale, w, offsets).block_until_ready()
                    results.append({"shape": shape_name, "batch": batch, "config": config})
                    continue
                operands = (packed, scales, lhs, offsets)
                f1 = jax.jit(lambda *a: many(*a, args.calls))
                f2 = jax.jit(lambda *a: many(*a, 2 * args.calls))
                f1(*operands).block_until_ready(); f2(*operands).block_until_ready()
                times = []
                for _ in range(args.repeats):
                    t0 = time.perf_counter(); f1(*operands).block_until_ready(); t1 = time.perf_counter()
                    f2(*operands).block_until_ready(); t2 = time.perf_counter()
                    times.append(((t2 - t1) - (t1 - t0)) / args.calls * 1e6)
                point = {"shape": shape_name, "batch": batch, "config": config, "us": float(np.median(times))}
                if args.check and rows <= 4096:
                    w = w4.W4Weights(packed[0], scales[0], layout="tiled")
                    got = np.asarray(fn(lhs, scale, w, offsets).astype(jnp.float32))
                    cpu = jax.devices("cpu")[0]
                    ref = jax.jit(lambda *a: w4.grouped_gemm(*a, implementation="reference"), device=cpu)(
                        *jax.device_put((lhs, scale, w, offsets), cpu))
                    ref = np.asarray(ref.astype(jnp.float32))
                    point["rel_err"] = float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30))
                    point["max_err_over_rms"] = float(np.max(np.abs(got - ref)) / max(np.sqrt(np.mean(ref ** 2)), 1e-30))
                results.append(point)
                print(f"{args.label} {shape_name} B={batch:5d} {config:24s} {point['us']:9.1f} us"
                      + (f"  rel_err {point['rel_err']:.2e} max/rms {point['max_err_over_rms']:.2e}" if "rel_err" in point else ""),
                      flush=True)
    with open(args.json, "w") as f:
        json.dump(results, f, indent=1)


def ncu_times(points_path, csv_path):
    """Attaches Nsight Compute kernel times (every second GroupedGemm launch: the measured one)
    to the points a --once run wrote."""
    import csv
    with open(csv_path) as f:
        lines = [line for line in f if line.startswith('"')]
    rows = [r for r in csv.DictReader(lines) if r.get("Metric Name") == "gpu__time_duration.sum"]
    scale = {"nsecond": 1e-3, "usecond": 1.0, "msecond": 1e3}
    times = [float(r["Metric Value"].replace(",", "")) * scale[r["Metric Unit"]] for r in rows]
    points = json.load(open(points_path))
    if len(times) != 2 * len(points):
        raise SystemExit(f"{csv_path}: {len(times)} GroupedGemm launches for {len(points)} points (want 2 each)")
    for point, t in zip(points, times[1::2]):
        point["us"] = t
    with open(points_path, "w") as f:
        json.dump(points, f, indent=1)


def compare(a_path, b_path):
    a = {(p["shape"], p["batch"], p["config"]): p["us"] for p in json.load(open(a_path))}
    b = {(p["shape"], p["batch"], p["config"]): p["us"] for p in json.load(open(b_path))}
    print(f"| shape | B | config | {a_path} us | {b_path} us | ratio |")
    print("|---|---:|---|---:|---:|---:|")
    for key in sorted(a.keys() & b.keys()):
        print(f"| {key[0]} | {key[1]} | {key[2]} | {a[key]:.1f} | {b[key]:.1f} | {b[key] / a[key]:.3f} |")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--label", default="build")
    p.add_argument("--json", default="gemm_ab.json")
    p.add_argument("--batches", type=int, nargs="+", default=sorted(PLAN))
    p.add_argument("--configs", nargs="+", default=None, help="names to time at every batch (default: PLAN)")
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--cuda", action=argparse.BooleanOptionalAction, default=True,
                   help="require the CUDA path (--no-cuda: a CPU smoke test of this script)")
    p.add_argument("--plan", choices=("heuristic", "sweep"), default="sweep")
    p.add_argument("--sets", type=int, default=6, help="rotating weight sets (6 x 256 experts > L2)")
    p.add_argument("--calls", type=int, default=12)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--check", action="store_true")
    p.add_argument("--compare", nargs=2, metavar=("A_JSON", "B_JSON"))
    p.add_argument("--once", action="store_true", help="one measured launch per point, for Nsight Compute")
    p.add_argument("--ncu", nargs=2, metavar=("POINTS_JSON", "NCU_CSV"), help="attach ncu kernel times")
    args = p.parse_args()
    if args.compare:
        compare(*args.compare)
    elif args.ncu:
        ncu_times(*args.ncu)
    else:
        run(args)


if __name__ == "__main__":
    main()
