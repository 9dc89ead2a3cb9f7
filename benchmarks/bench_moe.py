"""Whole-layer MoE benchmark at DeepSeek-V3 TP4 shapes (E=256, H=7168, I=512, top-8,
routed_scaling_factor 2.5, static a1/a2 scales), against its floors and its peers.

For every B (decode sizes up to the prefill rows B = 4096 and 8192) it reports our jitted
`moe(implementation="cuda")` at precision None (DEFAULT) with the router excluded (given topk
ids/weights) and included (`deepseek_topk` on random logits + bias, then `moe`), the layer at
precision=jax.lax.Precision.HIGHEST from --highest-min-b up (where the precisions may pick
different GEMM kernels),
the two grouped GEMMs alone on the same routing (and so the share of the layer's time spent
outside them), the floor of both GEMMs (weight bytes of the experts hit / the measured copy
bandwidth, or 2 rows (2I H + H I) / the measured fp8 rate when larger), and the peers: the
best pure-JAX layer a user has (weights dequantized to bf16 once, then jax.lax.ragged_dot on
expert-sorted rows; and a dense all-experts einsum where it fits) and the torch layer
(torch._grouped_mm bf16 or torch._scaled_grouped_mm fp8 with torch glue: argsort routing,
gather, silu*up, index_add combine; replayed as a CUDA graph when capture works).

  python3 benchmarks/bench_moe.py [--json out.json] [--png out.png] [--quick] [--batches ...]
"""

from __future__ import annotations

import dataclasses

import timing  # first: the JAX allocator flag, the import path and the torch guard
import problems as P
import peers
import reports

import jax
import jax.numpy as jnp
import numpy as np

from w4afp8_jax import deepseek_topk, grouped_gemm, moe

BATCHES = (1, 4, 16, 32, 64, 128, 512, 2048, 4096, 8192)
QUICK_BATCHES = (1, 64, 4096)
PEERS = ("jax ragged_dot", "jax dense", "torch bf16", "torch fp8")


def make_instances(key, b, shape):
    e, h, i, k = shape.experts, shape.hidden, shape.intermediate, shape.top_k
    out = []
    for kk in jax.random.split(jax.random.fold_in(key, b), P.instance_count(b)):
        ks = jax.random.split(kk, 7)
        ids = P.uniform_topk_ids(ks[1], b, e, k)
        out.append({
            "x": jax.random.normal(ks[0], (b, h), jnp.bfloat16), "ids": ids,
            "weights": P.random_topk_weights(ks[2], b, k),
            "logits": jax.random.normal(ks[3], (b, e), jnp.float32),
            "bias": jax.random.normal(ks[4], (e,), jnp.float32) * 0.1,
            "offsets": P.group_offsets_of(ids, e),
            "q1": P.random_fp8(ks[5], b * k, h),
            "q2": P.random_fp8(ks[6], b * k, i),
        })
    return out


def run_ours(args, impl, shape, key, rates, problems):
    max_sets = 2 if args.quick else 4
    (n1, k1), (n2, k2) = shape.gemm1(), shape.gemm2()
    sets = [(P.random_w4_weights(ka, shape.experts, n1, k1), P.random_w4_weights(kb, shape.experts, n2, k2))
            for ka, kb in jax.random.split(key, (max_sets, 2))]
    per_expert = P.weight_bytes_per_expert(n1, k1) + P.weight_bytes_per_expert(n2, k2)
    a1, a2 = P.calibrate_scales(jax.random.fold_in(key, 1), shape, sets[0][0], impl)
    kw = dict(a1_scale=a1, a2_scale=a2, routed_scaling_factor=shape.routed_scaling_factor, implementation=impl)
    highest = jax.lax.Precision.HIGHEST

    def layer(x, ids, w, w13, w2):
        return moe(x, ids, w, w13, w2, **kw)

    def highest_layer(x, ids, w, w13, w2):
        return moe(x, ids, w, w13, w2, precision=highest, **kw)

    def routed_layer(x, logits, bias, w13, w2):
        w, ids = deepseek_topk(logits, bias, top_k=shape.top_k, n_group=shape.n_group, topk_group=shape.topk_group)
        return moe(x, ids, w, w13, w2, **kw)

    def gemms(q1, q2, offsets, w13, w2):
        return (grouped_gemm(q1, a1, w13, offsets, implementation=impl),
                grouped_gemm(q2, a2, w2, offsets, implementation=impl))

    rows_out = []
    for b, insts in problems.items():
        rows = b * shape.top_k
        hit = float(np.mean([P.experts_hit(p["ids"], shape.experts) for p in insts]))
        weight_bytes = hit * per_expert
        n_sets = P.weight_set_count(weight_bytes, max_sets)
        row = {"B": b, "rows": rows, "experts_hit": hit, "weight_sets": n_sets, "weight_bytes": weight_bytes,
               "weight_floor_us": weight_bytes / rates["copy_bytes_per_s"] * 1e6,
               "compute_floor_us": (2 * rows * (n1 * k1 + n2 * k2) / rates["fp8_flops_per_s"] * 1e6
                                    if rates.get("fp8_flops_per_s") else None)}
        row["floor_us"] = max(v for v in (row["weight_floor_us"], row["compute_floor_us"]) if v is not None)
        timing_kw = dict(estimate_s=row["floor_us"] * 1e-6, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms)
        w = [sets[j % n_sets] for j in range(len(insts))]
        layer_instances = [(p["x"], p["ids"], p["weights"], *w[j]) for j, p in enumerate(insts)]
        timed = [("layer", layer, layer_instances)]
        if args.highest_min_b and b >= args.highest_min_b:
            timed.append(("layer_highest", highest_layer, layer_instances))
        timed += [("layer_router", routed_layer, [(p["x"], p["logits"], p["bias"], *w[j]) for j, p in enumerate(insts)]),
                  ("gemms", gemms, [(p["q1"], p["q2"], p["offsets"], *w[j]) for j, p in enumerate(insts)])]
        for name, fn, instances in timed:
            seconds, detail = timing.time_jax(fn, instances, **timing_kw)
            row[f"{name}_us"], row[f"{name}_timing"] = seconds * 1e6, detail
        row["outside_gemms_share"] = 1.0 - row["gemms_us"] / row["layer_us"]
        row["fraction"] = row["floor_us"] / row["layer_us"]
        row["peers"] = {}
        rows_out.append(row)
        print(f"  B={b}: layer {row['layer_us']:.1f} us"
              + (f" (HIGHEST {row['layer_highest_us']:.1f} us)" if "layer_highest_us" in row else "")
              + f", +router {row['layer_router_us']:.1f} us, gemms {row['gemms_us']:.1f} us, "
              f"floor {row['floor_us']:.1f} us", flush=True)
    return rows_out, sets[0], (a1, a2)


def run_torch(args, shape, key, problems, rows_out):
    torch = timing.torch
    if not timing.torch_ok():
        for row in rows_out:
            row["peers"].update({p: {"us": None, "note": "n/a: " + timing.TORCH_UNAVAILABLE} for p in PEERS[2:]})
        return
    e, h, i = shape.experts, shape.hidden, shape.intermediate
    gen = torch.Generator(device="cuda").manual_seed(int(jax.random.randint(key, (), 0, 2**31 - 1)))
    w13 = torch.randn(e, 2 * i, h, device="cuda", dtype=torch.bfloat16, generator=gen).mul_(0.02)
    w2 = torch.randn(e, h, i, device="cuda", dtype=torch.bfloat16, generator=gen).mul_(0.02)
    for precision in ("bf16", "fp8"):
        name = f"torch {precision}"
        scales = (None, None)
        if precision == "fp8":
            w13, w2 = w13.to(torch.float8_e4m3fn), w2.to(torch.float8_e4m3fn)
            scales = (torch.rand(e, 2 * i, device="cuda", generator=gen) * 0.01,
                      torch.rand(e, h, device="cuda", generator=gen) * 0.01)
        guard = timing.PeerGuard(name, args.peer_limit_ms)
        for row in rows_out:
            p = problems[row["B"]][0]

            def setup(p=p, scales=scales, row=row, name=name):
                x = peers.to_torch(p["x"].astype(jnp.float32)).bfloat16()
                ids, tw = peers.to_torch(p["ids"]), peers.to_torch(p["weights"])
                eager = lambda: peers.torch_layer(x, ids, tw, w13, w2, *scales,  # noqa: E731
                                                  routed_scaling_factor=shape.routed_scaling_factor)
                eager()
                graphed = timing.torch_graphed(eager)
                row.setdefault("torch_mode", {})[name] = "cuda graph" if graphed else "eager"
                fn = graphed or eager
                return fn, lambda: timing.bench(fn, args.warmup_ms, args.rep_ms)

            row["peers"][name] = guard.run(row["B"], setup)
            print(f"  B={row['B']}: {name} {reports.fmt(row['peers'][name]['us'])} us "
                  f"({row.get('torch_mode', {}).get(name, '-')})", flush=True)


def run_pure_jax(args, shape, weights, problems, rows_out):
    w13_t, w2_t = peers.dequantize_bf16_t(weights[0]), peers.dequantize_bf16_t(weights[1])
    e, i = shape.experts, shape.intermediate
    for name, layer_fn in (("jax ragged_dot", peers.jax_ragged_layer), ("jax dense", peers.jax_dense_layer)):
        fn = lambda x, ids, tw, a, b, f=layer_fn: f(x, ids, tw, a, b, shape.routed_scaling_factor)  # noqa: E731
        guard = timing.PeerGuard(name, args.peer_limit_ms)
        single = jax.jit(fn)
        for row in rows_out:
            if name == "jax dense" and row["B"] * e * 2 * i * 6 > args.dense_max_gb * 1e9:
                row["peers"][name] = {"us": None, "note": f"skipped: intermediates over {args.dense_max_gb} GB"}
                continue
            insts = [(p["x"], p["ids"], p["weights"], w13_t, w2_t) for p in problems[row["B"]][:4]]

            def setup(insts=insts, fn=fn):
                return (lambda: single(*insts[0])), lambda: timing.time_jax(
                    fn, insts, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms)[0]

            row["peers"][name] = guard.run(row["B"], setup)
            print(f"  B={row['B']}: {name} {reports.fmt(row['peers'][name]['us'])} us", flush=True)


def report(rows_out, title, rates) -> None:
    headers = ["B", "rows", "hit", "layer us", "HIGHEST layer us", "+router us", "gemms us", "outside %",
               "weight floor us", "compute floor us", "frac of floor"] + [f"{p} us" for p in PEERS]
    table = [[r["B"], r["rows"], f"{r['experts_hit']:.1f}", r["layer_us"], r.get("layer_highest_us"),
              r["layer_router_us"], r["gemms_us"], 100 * r["outside_gemms_share"], r["weight_floor_us"],
              r["compute_floor_us"], r["fraction"]]
             + [r["peers"].get(p, {}).get("us") for p in PEERS] for r in rows_out]
    notes = reports.peer_notes(rows_out)
    notes.append("layer: moe(..., precision=None) (DEFAULT: the GEMMs may use fp8 tensor-core accumulation); "
                 "HIGHEST layer: precision=jax.lax.Precision.HIGHEST (exact f32 group sums)")
    modes = {f"{k}: {v}" for r in rows_out for k, v in r.get("torch_mode", {}).items()}
    notes.append(f"weight floor = int4 + scale bytes of the experts hit in both GEMMs at the measured copy "
                 f"bandwidth {rates['copy_bytes_per_s'] / 1e12:.2f} TB/s; frac of floor = max(weight, compute "
                 "floor) / layer; outside % = share of the layer's time outside the two grouped GEMMs")
    notes.append("peers use one dense weight set (pure JAX: ours dequantized to bf16; torch: its own random "
                 "weights)" + (f"; torch layers ran as {', '.join(sorted(modes))}" if modes else ""))
    reports.print_table(title, headers, table, notes)


def main() -> None:
    parser = reports.base_parser(__doc__.split("\n\n")[0], BATCHES, QUICK_BATCHES)
    reports.add_jax_timing_args(parser, peer_limit_ms=200.0)
    parser.add_argument("--highest-min-b", type=int, default=128,
                        help="also time the layer at precision=HIGHEST from this B up; 0: never")
    parser.add_argument("--dense-max-gb", type=float, default=20.0,
                        help="skip the dense pure-JAX layer when its intermediates would exceed this")
    args, impl, env, rates, key = reports.start(parser, "bench_moe.py")
    shape = P.shape_for(args.dry_run)
    problems = {b: make_instances(jax.random.fold_in(key, 0), b, shape) for b in args.batches}
    rows_out, weights, (a1, a2) = run_ours(args, impl, shape, jax.random.fold_in(key, 1), rates, problems)
    print(f"static scales: a1 = {a1:.4g}, a2 = {a2:.4g}")
    if not args.no_peers:  # torch first: JAX's memory pool keeps what the pure-JAX peers grow it to
        run_torch(args, shape, jax.random.fold_in(key, 2), problems, rows_out)
        timing.free_torch()  # its weights are gone with the function's frame
        run_pure_jax(args, shape, weights, problems, rows_out)
    title = (f"MoE layer E={shape.experts}, H={shape.hidden}, I={shape.intermediate}, top-{shape.top_k}, "
             f"routed_scaling_factor {shape.routed_scaling_factor} ({impl})")
    report(rows_out, title, rates)
    reports.write_json(args.json, {"environment": env, "rates": rates, "shape": dataclasses.asdict(shape),
                                   "a1_scale": a1, "a2_scale": a2, "rows": rows_out})
    xs = [r["B"] for r in rows_out]
    lines = {"ours": [r["layer_us"] for r in rows_out],
             "ours, HIGHEST": [r.get("layer_highest_us") for r in rows_out],
             "ours + router": [r["layer_router_us"] for r in rows_out],
             "ours, two GEMMs only": [r["gemms_us"] for r in rows_out]}
    lines.update({p: [r["peers"].get(p, {}).get("us") for r in rows_out] for p in PEERS})
    reports.write_png(args.png, [{"title": title, "x": xs, "lines": lines,
                                  "dashed": {"floor of both GEMMs": [r["floor_us"] for r in rows_out]}}],
                      f"{env['device_kind']}: copy {rates['copy_bytes_per_s'] / 1e12:.2f} TB/s")


if __name__ == "__main__":
    main()
