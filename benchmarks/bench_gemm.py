"""Grouped GEMM benchmark at DeepSeek-V3 TP4 shapes, against its floors and its peers.

GEMM1: [rows, 7168] fp8 x [E=256, 7168 -> 1024] int4;  GEMM2: [rows, 512] x [256, 512 -> 7168];
rows = 8 B for B tokens with uniform random top-8 routing (group offsets from `route`).

For every B it reports our jitted `grouped_gemm(implementation="cuda")` (default tile
config; with --sweep every config of the kernel's table and the best), the memory floor
((int4 + scale bytes of the experts hit + fp8 activation bytes + bf16 output bytes) / the
copy bandwidth measured in this run), the compute floor (2 rows N K / the fp8 rate measured
in this run), the fraction of the floor reached, and the peers on the same shapes and
routing: torch._grouped_mm (bf16), torch._scaled_grouped_mm (fp8, row/column scales) and
jax.lax.ragged_dot (bf16), each on one dense weight set.

  python3 benchmarks/bench_gemm.py [--json out.json] [--png out.png] [--quick] [--sweep [CONFIGS]]
"""

from __future__ import annotations

import common as C  # first: sets the JAX allocator flags and the import path
import jax
import jax.numpy as jnp
import numpy as np

from w4afp8_jax import grouped_gemm
from w4afp8_jax.ops import grouped_gemm as gemm_module

PEERS = ("torch bf16", "torch fp8", "ragged_dot")


def gemm_shapes(dry_run: bool) -> dict:
    e, h, i = (16, 256, 128) if dry_run else (C.NUM_EXPERTS, C.HIDDEN, C.INTER)
    return {"experts": e,
            "gemm1": {"n": 2 * i, "k": h, "title": f"GEMM1 [rows, {h}] x [{e}, {h} -> {2 * i}]"},
            "gemm2": {"n": h, "k": i, "title": f"GEMM2 [rows, {i}] x [{e}, {i} -> {h}]"}}


def num_configs() -> tuple[int, str]:
    from w4afp8_jax import _backend
    module = _backend._w4afp8_cuda
    if module is not None and hasattr(module, "grouped_gemm_num_configs"):
        return int(module.grouped_gemm_num_configs()), "from the module"
    return 8, "assumed (module has no grouped_gemm_num_configs)"


class Problems:
    """Per B: routings (device ids, offsets) shared by both GEMMs and all methods."""

    def __init__(self, key, batches, experts):
        self.experts, self.by_b = experts, {}
        for b in batches:
            count = C.instance_count(b)
            keys = jax.random.split(jax.random.fold_in(key, b), count)
            ids = [C.uniform_topk_ids(k, b, experts) for k in keys]
            self.by_b[b] = {
                "ids": ids,
                "offsets": [C.group_offsets_of(i, experts) for i in ids],
                "hit": float(np.mean([C.experts_hit(np.asarray(i), experts) for i in ids])),
            }


def run_ours(args, impl, problems, shape, key, rates, result):
    e, n, k = problems.experts, shape["n"], shape["k"]
    max_sets = 2 if args.quick else 4
    wsets = [C.random_w4_weights(kk, e, n, k) for kk in jax.random.split(key, max_sets)]
    per_expert = C.weight_bytes_per_expert(wsets[0])
    scale = jnp.asarray(0.02, jnp.float32)
    configs, configs_note = num_configs()
    result["configs"] = {"count": configs, "source": configs_note}
    for b, prob in problems.by_b.items():
        rows = b * C.TOP_K
        lhs_keys = jax.random.split(jax.random.fold_in(key, b), len(prob["ids"]))
        lhs = [jax.random.normal(kk, (rows, k), jnp.bfloat16).astype(C.FP8) for kk in lhs_keys]
        weight_bytes = prob["hit"] * per_expert
        io_bytes = rows * k + rows * n * 2
        sets = C.weight_set_count(weight_bytes + io_bytes, max_sets)
        instances = [(x, scale, wsets[j % sets], off) for j, (x, off) in enumerate(zip(lhs, prob["offsets"]))]
        row = {"B": b, "rows": rows, "experts_hit": prob["hit"], "weight_sets": sets,
               "weight_bytes": weight_bytes, "io_bytes": io_bytes,
               "mem_floor_us": (weight_bytes + io_bytes) / rates["copy_bytes_per_s"] * 1e6,
               "compute_floor_us": (2 * rows * n * k / rates["fp8_flops_per_s"] * 1e6
                                    if rates.get("fp8_flops_per_s") else None)}
        row["floor_us"] = max(v for v in (row["mem_floor_us"], row["compute_floor_us"]) if v is not None)
        seconds, detail = C.time_jax(lambda x, s, w, o: grouped_gemm(x, s, w, o, implementation=impl),
                                     instances, estimate_s=row["floor_us"] * 1e-6,
                                     warmup_ms=args.warmup_ms, rep_ms=args.rep_ms)
        row.update(ours_us=seconds * 1e6, ours_timing=detail, fraction=row["floor_us"] / (seconds * 1e6))
        if impl == "cuda" and rows >= gemm_module.CUDA_FAST_ACCUMULATION_ROWS_PER_EXPERT * e:  # wgmma sizes
            t, _ = C.time_jax(lambda x, s, w, o: grouped_gemm(x, s, w, o, implementation=impl, fast_accumulation=True),
                              instances, calls=detail["calls"], warmup_ms=args.warmup_ms, rep_ms=args.rep_ms)
            row.update(fast_us=t * 1e6, fast_fraction=row["floor_us"] / (t * 1e6))
        if args.sweep and impl == "cuda":
            row["sweep_us"] = {}
            swept = range(configs) if args.sweep == "all" else [int(c) for c in args.sweep.split(",")]
            for c in swept:
                try:
                    t, _ = C.time_jax(
                        lambda x, s, w, o, c=c: gemm_module._grouped_gemm_cuda(x, s, w, o, config=c),
                        instances, calls=detail["calls"], warmup_ms=args.warmup_ms, rep_ms=args.rep_ms)
                    row["sweep_us"][c] = t * 1e6
                except Exception as err:  # noqa: BLE001 - a config may reject a shape
                    row["sweep_us"][c] = None
                    row.setdefault("sweep_errors", {})[c] = f"{type(err).__name__}: {err}"[:200]
            done = {c: t for c, t in row["sweep_us"].items() if t is not None}
            if done:
                row["best_config"] = min(done, key=done.get)
                row["best_us"] = done[row["best_config"]]
        row["peers"] = {}
        result["rows"].append(row)
        print(f"  {result['name']} B={b}: ours {row['ours_us']:.1f} us, floor {row['floor_us']:.1f} us"
              + (f", best config {row.get('best_config')} {row.get('best_us', float('nan')):.1f} us"
                 if "best_us" in row else ""), flush=True)


def run_torch_peers(args, problems, shape, key, result):
    torch = C.torch
    e, n, k = problems.experts, shape["n"], shape["k"]
    if not C.torch_ok():
        for row in result["rows"]:
            row["peers"].update({p: {"us": None, "note": "n/a: " + str(C._TORCH_ERROR)} for p in PEERS[:2]})
        return
    gen = torch.Generator(device="cuda").manual_seed(int(jax.random.randint(key, (), 0, 2**31 - 1)))
    w = torch.randn(e, n, k, device="cuda", dtype=torch.bfloat16, generator=gen).mul_(0.02)  # [E, N, K], K contiguous
    guards = {p: C.PeerGuard(p, args.peer_limit_ms) for p in PEERS[:2]}
    for precision in ("bf16", "fp8"):
        if precision == "fp8":
            w = w.to(torch.float8_e4m3fn)
            w_scale = torch.rand(e, n, device="cuda", generator=gen) + 0.5
        for row in result["rows"]:
            rows, prob = row["rows"], problems.by_b[row["B"]]
            offs = C.to_torch(np.asarray(prob["offsets"][0])[1:]).to(torch.int32)  # cumulative row ends [E]

            def setup(rows=rows, offs=offs, precision=precision):
                a = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16, generator=gen)
                if precision == "bf16":
                    fn = lambda: torch._grouped_mm(a, w.transpose(-2, -1), offs=offs)  # noqa: E731
                else:
                    a8 = a.to(torch.float8_e4m3fn)
                    a_scale = torch.rand(rows, device="cuda", generator=gen) + 0.5
                    fn = lambda: torch._scaled_grouped_mm(  # noqa: E731
                        a8, w.transpose(-2, -1), a_scale, w_scale, offs=offs, out_dtype=torch.bfloat16)
                return fn, lambda: C.bench(fn, args.warmup_ms, args.rep_ms)

            name = f"torch {precision}"
            row["peers"][name] = guards[name].run(row["B"], setup)
            print(f"  {result['name']} B={row['B']}: {name} {C.fmt(row['peers'][name]['us'])} us", flush=True)


def run_ragged_dot(args, problems, shape, key, result):
    e, n, k = problems.experts, shape["n"], shape["k"]
    rhs = (jax.random.normal(key, (e, k, n), jnp.bfloat16) * 0.02).astype(jnp.bfloat16)
    guard = C.PeerGuard("ragged_dot", args.peer_limit_ms)
    ragged = jax.jit(lambda x, r, g: jax.lax.ragged_dot(x, r, g))
    for row in result["rows"]:
        prob = problems.by_b[row["B"]]

        def setup(row=row, prob=prob):
            keys = jax.random.split(jax.random.fold_in(key, row["B"]), 2)
            instances = [(jax.random.normal(kk, (row["rows"], k), jnp.bfloat16), rhs, jnp.diff(off).astype(jnp.int32))
                         for kk, off in zip(keys, prob["offsets"])]
            seconds = lambda: C.time_jax(lambda x, r, g: jax.lax.ragged_dot(x, r, g), instances,  # noqa: E731
                                         warmup_ms=args.warmup_ms, rep_ms=args.rep_ms)[0]
            return (lambda: ragged(*instances[0])), seconds

        row["peers"]["ragged_dot"] = guard.run(row["B"], setup)
        print(f"  {result['name']} B={row['B']}: ragged_dot {C.fmt(row['peers']['ragged_dot']['us'])} us", flush=True)


def report(results, args, rates) -> None:
    copy_tb = rates["copy_bytes_per_s"] / 1e12
    for res in results.values():
        sweep = any("best_us" in r for r in res["rows"])
        headers = ["B", "rows", "hit", "ours us", "mem floor us", "compute floor us", "frac of floor",
                   "fast-accum us", "fast frac"]
        headers += ["best cfg", "best us"] if sweep else []
        headers += [f"{p} us" for p in PEERS]
        table = []
        for r in res["rows"]:
            line = [r["B"], r["rows"], f"{r['experts_hit']:.1f}", r["ours_us"], r["mem_floor_us"],
                    r["compute_floor_us"], r["fraction"], r.get("fast_us"), r.get("fast_fraction")]
            line += [r.get("best_config"), r.get("best_us")] if sweep else []
            line += [r["peers"].get(p, {}).get("us") for p in PEERS]
            table.append(line)
        notes = C.peer_notes(res["rows"])
        notes.append("fast-accum: fast_accumulation=True (wgmma, inexact accumulation), timed where it changes the kernel")
        notes.append(f"memory floor at the measured copy bandwidth {copy_tb:.2f} TB/s; "
                     "fraction of floor = max(memory, compute floor) / ours")
        notes.append("ours rotates over several int4 weight sets and 32 (B<=128) or 4 routings per call; "
                     "peers use one dense weight set (do_bench flushes the L2 before each call)")
        C.print_table(res["title"], headers, table, notes)


def plot(results, args, rates, env) -> None:
    panels = []
    for res in results.values():
        xs = [r["B"] for r in res["rows"]]
        lines = {"ours (default config)": [r["ours_us"] for r in res["rows"]],
                 "ours (fast accumulation)": [r.get("fast_us") for r in res["rows"]]}
        if any("best_us" in r for r in res["rows"]):
            lines["ours (best config)"] = [r.get("best_us") for r in res["rows"]]
        for p in PEERS:
            lines[p] = [r["peers"].get(p, {}).get("us") for r in res["rows"]]
        panels.append({"title": res["title"], "x": xs, "lines": lines,
                       "dashed": {"floor (max of memory, compute)": [r["floor_us"] for r in res["rows"]]}})
    C.write_png(args.png, panels, f"{env['device_kind']}: copy {rates['copy_bytes_per_s'] / 1e12:.2f} TB/s, "
                f"fp8 {C.fmt((rates.get('fp8_flops_per_s') or float('nan')) / 1e12, 0)} TFLOP/s")


def main() -> None:
    parser = C.base_parser(__doc__.splitlines()[0], default_limit_ms=150.0)
    parser.add_argument("--sweep", nargs="?", const="all", default=None, metavar="CONFIGS",
                        help="also time every tile config of the kernel's table (or the comma-separated ones given)")
    args, impl, env, rates, key = C.start(parser, "bench_gemm.py")
    shapes = gemm_shapes(args.dry_run)
    problems = Problems(jax.random.fold_in(key, 0), args.batches, shapes["experts"])
    results = {g: {"name": g, "title": shapes[g]["title"], "n": shapes[g]["n"], "k": shapes[g]["k"], "rows": []}
               for g in ("gemm1", "gemm2")}
    # Order matters for memory: JAX's pool keeps what it grew to, so torch runs before ragged_dot.
    for i, g in enumerate(results):
        run_ours(args, impl, problems, shapes[g], jax.random.fold_in(key, 10 + i), rates, results[g])
    if not args.no_peers:
        for i, g in enumerate(results):
            run_torch_peers(args, problems, shapes[g], jax.random.fold_in(key, 20 + i), results[g])
            C.free_torch()  # its weights are gone with the function's frame
        for i, g in enumerate(results):
            run_ragged_dot(args, problems, shapes[g], jax.random.fold_in(key, 30 + i), results[g])
    report(results, args, rates)
    C.write_json(args.json, {"environment": env, "rates": rates, "experts": shapes["experts"],
                             "top_k": C.TOP_K, "results": results,
                             "peer_signatures": peer_signatures() if not args.no_peers else {}})
    plot(results, args, rates, env)


def peer_signatures() -> dict:
    """The schemas of the torch ops as this torch build has them (for reading the numbers)."""
    out = {}
    if C.torch_ok():
        for op in ("_grouped_mm", "_scaled_grouped_mm"):
            try:
                out[op] = str(getattr(C.torch.ops.aten, op).default._schema)
            except Exception as err:  # noqa: BLE001
                out[op] = f"unknown ({err})"
    return out


if __name__ == "__main__":
    main()
