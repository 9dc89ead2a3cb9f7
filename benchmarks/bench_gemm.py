"""Grouped GEMM benchmark at DeepSeek-V3 TP4 shapes, against its floors and its peers.

GEMM1: [rows, 7168] fp8 x [E=256, 7168 -> 1024] int4;  GEMM2: [rows, 512] x [256, 512 -> 7168];
rows = 8 B for B tokens with uniform random top-8 routing (group offsets from `route`).

For every B it reports our jitted `grouped_gemm(implementation="cuda")` with the heuristic's
configuration at precision None (DEFAULT: may use the inexact fp8 tensor-core kernels) and,
from --highest-min-b up, at jax.lax.Precision.HIGHEST (exact f32 group sums) too; with --sweep
every configuration of `w4afp8_jax.grouped_gemm_configs()` (or the named ones) and the best.
Against: the memory floor ((int4 + scale bytes of the experts hit + fp8 rows read + bf16
output written) / the copy bandwidth measured in this run) and the compute floor (2 rows N K /
the fp8 rate measured in this run with torch._scaled_mm 8192^3 e4m3), and the fraction of
each reached; and the peers on the same shapes and routing: the seed's CUTLASS W4A8 grouped
GEMM (sgl-kernel at PR #12921, CUDA-graph replays over rotating weight sets),
torch._scaled_grouped_mm (fp8, row/column scales), torch._grouped_mm (bf16) and
jax.lax.ragged_dot (bf16), the last three on one dense weight set.

A whole run (12 B values, both GEMMs, all peers) takes several minutes on an H200; restrict it
with --batches, --gemms and --peers, e.g. decode sizes and prefill sizes in two calls:

  python3 benchmarks/bench_gemm.py --batches 1,4,16,32,64,128 --json $OUT/gemm_decode.json
  python3 benchmarks/bench_gemm.py --batches 256,512,1024,2048,4096,8192 --peers seed,torch-fp8 \\
      --json $OUT/gemm_prefill.json
"""

from __future__ import annotations

import argparse

import timing  # first: the JAX allocator flag, the import path and the torch guard
import problems as P
import peers
import reports

import jax
import jax.numpy as jnp
import numpy as np

import w4afp8_jax
from w4afp8_jax import grouped_gemm

BATCHES = (1, 4, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
QUICK_BATCHES = (1, 64, 4096)
PEERS = {"seed": peers.SEED_NAME, "torch-fp8": "torch fp8", "torch-bf16": "torch bf16", "ragged_dot": "ragged_dot"}


def name_list(choices):
    def parse(text: str) -> tuple[str, ...]:
        names = tuple(s.strip() for s in text.split(",") if s.strip())
        bad = [n for n in names if n not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {', '.join(choices)}")
        return names
    return parse


class Problems:
    """Per B: routings (device ids, offsets) shared by both GEMMs and all methods."""

    def __init__(self, key, batches, shape):
        self.shape, self.by_b = shape, {}
        for b in batches:
            keys = jax.random.split(jax.random.fold_in(key, b), P.instance_count(b))
            ids = [P.uniform_topk_ids(k, b, shape.experts, shape.top_k) for k in keys]
            self.by_b[b] = {"ids": ids, "offsets": [P.group_offsets_of(i, shape.experts) for i in ids],
                            "hit": float(np.mean([P.experts_hit(i, shape.experts) for i in ids]))}


def run_ours(args, impl, problems, gemm, key, rates, result):
    shape = problems.shape
    n, k = P.gemm_shapes(shape)[gemm]
    max_sets = 2 if args.quick else 4
    wsets = [P.random_w4_weights(kk, shape.experts, n, k) for kk in jax.random.split(key, max_sets)]
    configs = w4afp8_jax.grouped_gemm_configs()
    swept = ([c for c in configs if args.sweep == "all" or c.name in args.sweep.split(",")]
             if args.sweep and impl == "cuda" else [])
    for b, prob in problems.by_b.items():
        rows = b * shape.top_k
        lhs = [P.random_fp8(kk, rows, k) for kk in jax.random.split(jax.random.fold_in(key, b), len(prob["ids"]))]
        row = {"B": b, "rows": rows, "experts_hit": prob["hit"], **P.gemm_floor(prob["hit"], rows, n, k, rates)}
        sets = P.weight_set_count(row["weight_bytes"] + row["io_bytes"], max_sets)
        row["weight_sets"] = sets
        instances = [(x, 0.02, wsets[j % sets], off) for j, (x, off) in enumerate(zip(lhs, prob["offsets"]))]

        def timed(precision=None, config=None, calls=None):
            return timing.time_jax(
                lambda x, s, w, o: grouped_gemm(x, s, w, o, precision=precision, config=config, implementation=impl),
                instances, calls=calls, estimate_s=row["floor_us"] * 1e-6, warmup_ms=args.warmup_ms,
                rep_ms=args.rep_ms)

        seconds, detail = timed()
        row.update(ours_us=seconds * 1e6, ours_timing=detail, **P.fractions(seconds * 1e6, row, rates))
        picks = {p: w4afp8_jax.grouped_gemm_default_config(rows, n, k, shape.experts, precision=p)
                 for p in (None, jax.lax.Precision.HIGHEST)}
        row["configs"] = {"default": picks[None], "highest": picks[jax.lax.Precision.HIGHEST]}
        if args.highest_min_b and b >= args.highest_min_b and picks[None] != picks[jax.lax.Precision.HIGHEST]:
            t, _ = timed(jax.lax.Precision.HIGHEST, calls=detail["calls"])
            row.update(highest_us=t * 1e6, highest_mem_fraction=P.fractions(t * 1e6, row, rates)["mem_fraction"],
                       highest_fp8_fraction=P.fractions(t * 1e6, row, rates)["fp8_fraction"])
        if swept:
            row["sweep_us"] = {}
            for c in swept:
                precision = jax.lax.Precision.HIGHEST if c.exact else jax.lax.Precision.DEFAULT
                try:
                    row["sweep_us"][c.name] = timed(precision, c.name, detail["calls"])[0] * 1e6
                except Exception as err:  # noqa: BLE001 - a configuration may reject a shape
                    row["sweep_us"][c.name] = None
                    row.setdefault("sweep_errors", {})[c.name] = timing.error_text(err, 200)
            done = {c: t for c, t in row["sweep_us"].items() if t is not None}
            if done:
                row["best_config"] = min(done, key=done.get)
                row["best_us"] = done[row["best_config"]]
        row["peers"] = {}
        result["rows"].append(row)
        print(f"  {gemm} B={b}: ours {row['ours_us']:.1f} us"
              + (f" (HIGHEST {row['highest_us']:.1f} us)" if "highest_us" in row else "")
              + f", floor {row['floor_us']:.1f} us"
              + (f", best config {row['best_config']} {row['best_us']:.1f} us" if "best_us" in row else ""),
              flush=True)
        if swept:
            print("    sweep: " + ", ".join(f"{c} {reports.fmt(t)}" for c, t in row["sweep_us"].items()), flush=True)


def run_seed(args, seed, problems, gemm, key, result):
    name = PEERS["seed"]
    torch = timing.torch
    n, k = seed.sizes[gemm]
    gen = torch.Generator(device="cuda").manual_seed(int(jax.random.randint(key, (), 0, 2**31 - 1)))
    sets = seed.weight_sets(gemm, args.peer_sets, gen)
    a_scale = torch.full((1,), 0.02, device="cuda", dtype=torch.float32)
    for row in result["rows"]:
        prob = problems.by_b[row["B"]]
        try:
            routing = seed.routing(peers.to_torch(prob["ids"][0]).to(torch.int32))
            row["seed_prep_matches"] = seed.check_routing(routing, prob["offsets"][0])
            x = torch.randn(row["rows"], k, device="cuda", dtype=torch.bfloat16, generator=gen).to(torch.float8_e4m3fn)
            c = torch.empty(row["rows"], n, device="cuda", dtype=torch.bfloat16)
            fns = [seed.gemm(gemm, c, x, ws, a_scale, routing) for ws in sets]
            us = timing.time_cuda_graph(fns, args.peer_iters) * 1e6
            row["peers"][name] = {"us": us, **P.fractions(us, row, result["rates"])}
            del x, c, fns, routing
        except Exception as err:  # noqa: BLE001 - report, keep going
            row["peers"][name] = {"us": None, "note": "n/a: " + timing.error_text(err)}
        timing.free_torch()
        print(f"  {gemm} B={row['B']}: seed {reports.fmt(row['peers'][name]['us'])} us", flush=True)


def run_torch(args, problems, gemm, key, result, wanted):
    shape = problems.shape
    n, k = P.gemm_shapes(shape)[gemm]
    gen = timing.torch.Generator(device="cuda").manual_seed(int(jax.random.randint(key, (), 0, 2**31 - 1)))
    for precision in ("bf16", "fp8"):
        name = f"torch {precision}"
        if name not in wanted:
            continue
        w, w_scale = peers.torch_weights(precision, shape.experts, n, k, gen)
        guard = timing.PeerGuard(name, args.peer_limit_ms)
        for row in result["rows"]:
            row_ends = peers.to_torch(np.asarray(problems.by_b[row["B"]]["offsets"][0])[1:]).to(timing.torch.int32)

            def setup(rows=row["rows"], row_ends=row_ends):
                a = timing.torch.randn(rows, k, device="cuda", dtype=timing.torch.bfloat16, generator=gen)
                fn = peers.torch_grouped_gemm(a, w, w_scale, row_ends)
                return fn, lambda: timing.bench(fn, args.warmup_ms, args.rep_ms)

            row["peers"][name] = guard.run(row["B"], setup)
            row["peers"][name].update(P.fractions(row["peers"][name]["us"], row, result["rates"]))
            print(f"  {gemm} B={row['B']}: {name} {reports.fmt(row['peers'][name]['us'])} us", flush=True)


def run_ragged_dot(args, problems, gemm, key, result):
    shape = problems.shape
    n, k = P.gemm_shapes(shape)[gemm]
    rhs = (jax.random.normal(key, (shape.experts, k, n), jnp.bfloat16) * 0.02).astype(jnp.bfloat16)
    guard = timing.PeerGuard("ragged_dot", args.peer_limit_ms)
    ragged = jax.jit(jax.lax.ragged_dot)
    for row in result["rows"]:
        prob = problems.by_b[row["B"]]

        def setup(row=row, prob=prob):
            keys = jax.random.split(jax.random.fold_in(key, row["B"]), 2)
            instances = [(jax.random.normal(kk, (row["rows"], k), jnp.bfloat16), rhs, jnp.diff(off).astype(jnp.int32))
                         for kk, off in zip(keys, prob["offsets"])]
            seconds = lambda: timing.time_jax(jax.lax.ragged_dot, instances, warmup_ms=args.warmup_ms,  # noqa: E731
                                              rep_ms=args.rep_ms)[0]
            return (lambda: ragged(*instances[0])), seconds

        row["peers"]["ragged_dot"] = guard.run(row["B"], setup)
        print(f"  {gemm} B={row['B']}: ragged_dot {reports.fmt(row['peers']['ragged_dot']['us'])} us", flush=True)


def report(results, rates) -> None:
    copy_tb = rates["copy_bytes_per_s"] / 1e12
    fp8_tf = (rates.get("fp8_flops_per_s") or float("nan")) / 1e12
    for res in results.values():
        sweep = any("best_us" in r for r in res["rows"])
        highest = any("highest_us" in r for r in res["rows"])
        peer_names = [p for p in PEERS.values() if any(p in r["peers"] for r in res["rows"])]
        headers = ["B", "rows", "hit", "ours us", "mem floor us", "compute floor us", "of mem floor", "of fp8 rate"]
        headers += ["HIGHEST us", "HIGHEST of fp8"] if highest else []
        headers += ["best config", "best us"] if sweep else []
        for p in peer_names:
            headers += [f"{p} us"] + (["of mem floor", "of fp8 rate"] if p in (PEERS["seed"], "torch fp8") else [])
        table = []
        for r in res["rows"]:
            line = [r["B"], r["rows"], f"{r['experts_hit']:.1f}", r["ours_us"], r["mem_floor_us"],
                    r["compute_floor_us"], r["mem_fraction"], r["fp8_fraction"]]
            line += [r.get("highest_us"), r.get("highest_fp8_fraction")] if highest else []
            line += [r.get("best_config"), r.get("best_us")] if sweep else []
            for p in peer_names:
                v = r["peers"].get(p, {})
                line += [v.get("us")] + ([v.get("mem_fraction"), v.get("fp8_fraction")]
                                         if p in (PEERS["seed"], "torch fp8") else [])
            table.append(line)
        notes = reports.peer_notes(res["rows"])
        notes.append("ours: precision None (DEFAULT, the heuristic may pick an inexact fp8 tensor-core kernel)"
                     + ("; HIGHEST: precision=jax.lax.Precision.HIGHEST (exact f32 group sums)" if highest else ""))
        notes.append(f"floors at the measured copy bandwidth {copy_tb:.2f} TB/s and fp8 rate {fp8_tf:.0f} TFLOP/s; "
                     "of mem floor = memory floor / time; of fp8 rate = 2 rows N K / time / fp8 rate")
        notes.append("ours rotates over several int4 weight sets and 32 (B<=128) or 4 routings per call; the seed "
                     "replays a CUDA graph over rotating weight sets; the torch peers and ragged_dot use one dense "
                     "weight set (do_bench flushes the L2 before each call)")
        mismatched = [r["B"] for r in res["rows"] if r.get("seed_prep_matches") is False]
        if mismatched:
            notes.append(f"WARNING: the seed's data prep offsets differ from ours at B={mismatched}")
        reports.print_table(res["title"], headers, table, notes)


def plot(results, args, rates, env) -> None:
    panels = []
    for res in results.values():
        xs = [r["B"] for r in res["rows"]]
        lines = {"ours (precision None)": [r["ours_us"] for r in res["rows"]],
                 "ours (HIGHEST)": [r.get("highest_us") for r in res["rows"]]}
        if any("best_us" in r for r in res["rows"]):
            lines["ours (best config)"] = [r.get("best_us") for r in res["rows"]]
        for p in PEERS.values():
            lines[p] = [r["peers"].get(p, {}).get("us") for r in res["rows"]]
        panels.append({"title": res["title"], "x": xs, "lines": lines,
                       "dashed": {"floor (max of memory, compute)": [r["floor_us"] for r in res["rows"]]}})
    reports.write_png(args.png, panels, f"{env['device_kind']}: copy {rates['copy_bytes_per_s'] / 1e12:.2f} TB/s, "
                      f"fp8 {reports.fmt((rates.get('fp8_flops_per_s') or float('nan')) / 1e12, 0)} TFLOP/s")


def main() -> None:
    parser = reports.base_parser(__doc__.split("\n\n")[0], BATCHES, QUICK_BATCHES)
    reports.add_jax_timing_args(parser, peer_limit_ms=150.0)
    parser.add_argument("--gemms", type=name_list(("gemm1", "gemm2")), default=("gemm1", "gemm2"))
    parser.add_argument("--peers", type=name_list(tuple(PEERS)), default=tuple(PEERS),
                        help="comma-separated peers to time (default: %s)" % ",".join(PEERS))
    parser.add_argument("--highest-min-b", type=int, default=128,
                        help="also time precision=HIGHEST from this B up where the heuristic picks another kernel "
                             "for it; 0: never")
    parser.add_argument("--sweep", nargs="?", const="all", default=None, metavar="CONFIGS",
                        help="also time every configuration of grouped_gemm_configs() (or the comma-separated names)")
    parser.add_argument("--peer-sets", type=int, default=4, help="weight sets the seed rotates over")
    parser.add_argument("--peer-iters", type=int, default=30, help="CUDA-graph replays per seed measurement")
    peers.add_seed_dir_arg(parser)
    args, impl, env, rates, key = reports.start(parser, "bench_gemm.py")
    shape = P.shape_for(args.dry_run)
    problems = Problems(jax.random.fold_in(key, 0), args.batches, shape)
    results = {}
    for g in args.gemms:
        n, k = P.gemm_shapes(shape)[g]
        results[g] = {"name": g, "n": n, "k": k, "rows": [], "rates": rates,
                      "title": f"{g.upper()} [rows, {k}] x [{shape.experts}, {k} -> {n}] ({impl})"}
    for i, g in enumerate(args.gemms):
        run_ours(args, impl, problems, g, jax.random.fold_in(key, 10 + i), rates, results[g])
    wanted = set() if args.no_peers or args.dry_run else {PEERS[p] for p in args.peers}
    unavailable = None if timing.torch_ok() else "n/a: " + timing.TORCH_UNAVAILABLE
    seed = None
    if PEERS["seed"] in wanted and unavailable is None:
        try:
            seed = peers.SeedKernels(peers.seed_dir(args), shape)
            print(f"seed: {seed.library} ({seed.build_info})", flush=True)
        except Exception as err:  # noqa: BLE001 - a missing peer is reported, not fatal
            unavailable_seed = "n/a: " + timing.error_text(err)
            print(f"seed: {unavailable_seed}", flush=True)
            for res in results.values():
                for row in res["rows"]:
                    row["peers"][PEERS["seed"]] = {"us": None, "note": unavailable_seed}
    # Order matters for memory: JAX's pool keeps what it grew to, so torch runs before ragged_dot.
    for i, g in enumerate(args.gemms):
        if unavailable:
            for row in results[g]["rows"]:
                row["peers"].update({p: {"us": None, "note": unavailable} for p in wanted if p != "ragged_dot"})
            continue
        if seed is not None:
            run_seed(args, seed, problems, g, jax.random.fold_in(key, 40 + i), results[g])
        run_torch(args, problems, g, jax.random.fold_in(key, 20 + i), results[g], wanted)
        timing.free_torch()  # its weights are gone with the function's frame
    if "ragged_dot" in wanted:
        for i, g in enumerate(args.gemms):
            run_ragged_dot(args, problems, g, jax.random.fold_in(key, 30 + i), results[g])
    report(results, rates)
    for res in results.values():
        del res["rates"]
    reports.write_json(args.json, {"environment": env, "rates": rates, "experts": shape.experts,
                                   "top_k": shape.top_k, "results": results,
                                   "seed_library": seed.library if seed else None,
                                   "peer_signatures": peers.torch_signatures() if wanted else {}})
    plot(results, args, rates, env)


if __name__ == "__main__":
    main()
