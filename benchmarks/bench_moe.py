"""Whole-layer MoE benchmark at DeepSeek-V3 TP4 shapes (E=256, H=7168, I=512, top-8,
routed_scaling_factor 2.5, static a1/a2 scales), against its floors and its peers.

For every B it reports our jitted `moe(implementation="cuda")` with the router excluded
(given topk ids/weights) and included (`deepseek_topk` on random logits + bias, then `moe`),
the two grouped GEMMs alone on the same routing (and so the share of the layer's time spent
outside them), the floor of both GEMMs (weight bytes of the experts hit / the measured copy
bandwidth, or 2 rows (2I H + H I) / the measured fp8 rate when larger), and the peers: the
best pure-JAX layer a user has (weights dequantized to bf16 once, then jax.lax.ragged_dot on
expert-sorted rows; and a dense all-experts einsum where it fits) and the torch layer
(torch._grouped_mm bf16 or torch._scaled_grouped_mm fp8 with torch glue: argsort routing,
gather, silu*up, index_add combine; replayed as a CUDA graph when capture works).

  python3 benchmarks/bench_moe.py [--json out.json] [--png out.png] [--quick]
"""

from __future__ import annotations

import common as C  # first: sets the JAX allocator flags and the import path
import jax
import jax.numpy as jnp
import numpy as np

from w4afp8_jax import deepseek_topk, gather_quantize, grouped_gemm, moe, route
from w4afp8_jax.ops.grouped_gemm import CUDA_FAST_ACCUMULATION_ROWS_PER_EXPERT

PEERS = ("jax ragged_dot", "jax dense", "torch bf16", "torch fp8")


def layer_shape(dry_run: bool) -> dict:
    e, h, i = (16, 256, 128) if dry_run else (C.NUM_EXPERTS, C.HIDDEN, C.INTER)
    return {"experts": e, "hidden": h, "inter": i}


def silu_mul_f32(c1):
    inter = c1.shape[-1] // 2
    return jax.nn.silu(c1[..., :inter].astype(jnp.float32)) * c1[..., inter:].astype(jnp.float32)


def calibrate(key, shape, w13, impl) -> tuple[float, float]:
    """Static a1/a2 scales as a checkpoint would have them: amax / 448 of the GEMM inputs on a
    calibration batch of 64 tokens."""
    k_x, k_ids = jax.random.split(key)
    x = jax.random.normal(k_x, (64, shape["hidden"]), jnp.bfloat16)
    ids = C.uniform_topk_ids(k_ids, 64, shape["experts"])
    a1 = float(jnp.max(jnp.abs(x.astype(jnp.float32)))) / 448.0
    routing = route(ids, shape["experts"], implementation=impl)
    q1, s1 = gather_quantize(x, routing.positions, a1, implementation=impl)
    c1 = grouped_gemm(q1, s1, w13, routing.group_offsets, implementation=impl)
    a2 = float(jnp.max(jnp.abs(silu_mul_f32(c1)))) / 448.0
    return a1, a2


def make_instances(key, b, shape):
    e, h, i = shape["experts"], shape["hidden"], shape["inter"]
    out = []
    for kk in jax.random.split(jax.random.fold_in(key, b), C.instance_count(b)):
        k = jax.random.split(kk, 6)
        ids = C.uniform_topk_ids(k[1], b, e)
        out.append({
            "x": jax.random.normal(k[0], (b, h), jnp.bfloat16), "ids": ids,
            "weights": C.random_topk_weights(k[2], b),
            "logits": jax.random.normal(k[3], (b, e), jnp.float32),
            "bias": jax.random.normal(k[4], (e,), jnp.float32) * 0.1,
            "offsets": C.group_offsets_of(ids, e),
            "q1": jax.random.normal(k[5], (b * C.TOP_K, h), jnp.bfloat16).astype(C.FP8),
            "q2": jax.random.normal(jax.random.fold_in(k[5], 1), (b * C.TOP_K, i), jnp.bfloat16).astype(C.FP8),
        })
    return out


def run_ours(args, impl, shape, key, rates, problems, scales):
    max_sets = 2 if args.quick else 4
    sets = [(C.random_w4_weights(k1, shape["experts"], 2 * shape["inter"], shape["hidden"]),
             C.random_w4_weights(k2, shape["experts"], shape["hidden"], shape["inter"]))
            for k1, k2 in jax.random.split(key, (max_sets, 2))]
    per_expert = C.weight_bytes_per_expert(sets[0][0]) + C.weight_bytes_per_expert(sets[0][1])
    if scales is None:
        scales = calibrate(jax.random.fold_in(key, 1), shape, sets[0][0], impl)
    a1, a2 = scales
    kw = dict(a1_scale=a1, a2_scale=a2, routed_scaling_factor=C.ROUTED_SCALING_FACTOR, implementation=impl)
    s1, s2 = jnp.asarray(a1, jnp.float32), jnp.asarray(a2, jnp.float32)
    h, i = shape["hidden"], shape["inter"]

    def layer(x, ids, w, w13, w2):
        return moe(x, ids, w, w13, w2, **kw)

    def fast_layer(x, ids, w, w13, w2):
        return moe(x, ids, w, w13, w2, fast_accumulation=True, **kw)

    def routed_layer(x, logits, bias, w13, w2):
        w, ids = deepseek_topk(logits, bias)
        return moe(x, ids, w, w13, w2, **kw)

    def gemms(q1, q2, offsets, w13, w2):
        return (grouped_gemm(q1, s1, w13, offsets, implementation=impl),
                grouped_gemm(q2, s2, w2, offsets, implementation=impl))

    rows_out = []
    for b, insts in problems.items():
        rows = b * C.TOP_K
        hit = float(np.mean([C.experts_hit(np.asarray(p["ids"]), shape["experts"]) for p in insts]))
        weight_bytes = hit * per_expert
        n_sets = C.weight_set_count(weight_bytes, max_sets)
        row = {"B": b, "rows": rows, "experts_hit": hit, "weight_sets": n_sets, "weight_bytes": weight_bytes,
               "weight_floor_us": weight_bytes / rates["copy_bytes_per_s"] * 1e6,
               "compute_floor_us": (2 * rows * 3 * i * h / rates["fp8_flops_per_s"] * 1e6
                                    if rates.get("fp8_flops_per_s") else None)}
        row["floor_us"] = max(v for v in (row["weight_floor_us"], row["compute_floor_us"]) if v is not None)
        timing = dict(estimate_s=row["floor_us"] * 1e-6, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms)
        w = [sets[j % n_sets] for j in range(len(insts))]
        layer_instances = [(p["x"], p["ids"], p["weights"], *w[j]) for j, p in enumerate(insts)]
        # where fast_accumulation changes the GEMM kernel
        wgmma_sizes = impl == "cuda" and rows >= CUDA_FAST_ACCUMULATION_ROWS_PER_EXPERT * shape["experts"]
        fast = [("layer_fast", fast_layer, layer_instances)] if wgmma_sizes else []
        for name, fn, instances in (
                ("layer", layer, layer_instances), *fast,
                ("layer_router", routed_layer, [(p["x"], p["logits"], p["bias"], *w[j]) for j, p in enumerate(insts)]),
                ("gemms", gemms, [(p["q1"], p["q2"], p["offsets"], *w[j]) for j, p in enumerate(insts)])):
            seconds, detail = C.time_jax(fn, instances, **timing)
            row[f"{name}_us"], row[f"{name}_timing"] = seconds * 1e6, detail
        row["outside_gemms_share"] = 1.0 - row["gemms_us"] / row["layer_us"]
        row["fraction"] = row["floor_us"] / row["layer_us"]
        row["peers"] = {}
        rows_out.append(row)
        print(f"  B={b}: layer {row['layer_us']:.1f} us, +router {row['layer_router_us']:.1f} us, "
              f"gemms {row['gemms_us']:.1f} us, floor {row['floor_us']:.1f} us", flush=True)
    return rows_out, sets[0], scales


def torch_layer(shape, x, ids, tw, w13, w2, s13=None, s2=None):
    """The torch MoE layer: weights [E, N, K] (K contiguous); s13/s2 per-column f32 scales for fp8."""
    torch = C.torch
    e, i = shape["experts"], shape["inter"]
    b, k = ids.shape
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    token = order // k
    counts = torch.zeros(e, dtype=torch.int32, device=x.device).index_add_(
        0, flat, torch.ones_like(flat, dtype=torch.int32))
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    c1 = _torch_gmm(x.index_select(0, token), w13, offs, s13)
    hid = torch.nn.functional.silu(c1[:, :i]) * c1[:, i:]
    c2 = _torch_gmm(hid, w2, offs, s2)
    contrib = c2.float() * tw.reshape(-1)[order].unsqueeze(1)
    out = torch.zeros(b, x.shape[1], dtype=torch.float32, device=x.device).index_add_(0, token, contrib)
    return (out * C.ROUTED_SCALING_FACTOR).to(torch.bfloat16)


def _torch_gmm(a, w, offs, w_scale):
    torch = C.torch
    if w_scale is None:
        return torch._grouped_mm(a, w.transpose(-2, -1), offs=offs)
    a_scale = a.abs().amax(dim=1).float().clamp_min(1e-12) / 448.0  # dynamic per-row fp8
    a8 = (a.float() / a_scale.unsqueeze(1)).to(torch.float8_e4m3fn)
    return torch._scaled_grouped_mm(a8, w.transpose(-2, -1), a_scale, w_scale, offs=offs, out_dtype=torch.bfloat16)


def run_torch(args, shape, key, problems, rows_out):
    torch = C.torch
    if not C.torch_ok():
        for row in rows_out:
            row["peers"].update({p: {"us": None, "note": "n/a: " + str(C._TORCH_ERROR)} for p in PEERS[2:]})
        return
    e, h, i = shape["experts"], shape["hidden"], shape["inter"]
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
        guard = C.PeerGuard(name, args.peer_limit_ms)
        for row in rows_out:
            p = problems[row["B"]][0]

            def setup(p=p, scales=scales, row=row, name=name):
                x, ids, tw = C.to_torch(p["x"].astype(jnp.float32)).bfloat16(), C.to_torch(p["ids"]), C.to_torch(p["weights"])
                eager = lambda: torch_layer(shape, x, ids, tw, w13, w2, *scales)  # noqa: E731
                eager()
                graphed = C.torch_graphed(eager)
                row.setdefault("torch_mode", {})[name] = "cuda graph" if graphed else "eager"
                fn = graphed or eager
                return fn, lambda: C.bench(fn, args.warmup_ms, args.rep_ms)

            row["peers"][name] = guard.run(row["B"], setup)
            print(f"  B={row['B']}: {name} {C.fmt(row['peers'][name]['us'])} us "
                  f"({row.get('torch_mode', {}).get(name, '-')})", flush=True)


def dequantize_bf16_t(w) -> jax.Array:
    """bf16 [E, K, N] (the layout ragged_dot takes) from W4Weights [E, N, K], a few experts at a time."""
    step = max(1, w.num_experts // 16)
    f = jax.jit(lambda packed, scales: jnp.swapaxes(
        type(w)(packed, scales, w.group_size).dequantize().astype(jnp.bfloat16), 1, 2))
    return jnp.concatenate([f(w.packed[s:s + step], w.scales[s:s + step])
                            for s in range(0, w.num_experts, step)], axis=0)


def jax_ragged_layer(x, ids, tw, w13_t, w2_t):
    """Pure JAX: expert-sorted rows, ragged_dot on bf16 weights for both GEMMs, f32 combine."""
    b, k = ids.shape
    e = w13_t.shape[0]
    flat = ids.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    token = order // k
    sizes = jnp.zeros(e, jnp.int32).at[flat].add(1)
    c1 = jax.lax.ragged_dot(x[token], w13_t, sizes)
    hid = silu_mul_f32(c1).astype(jnp.bfloat16)
    c2 = jax.lax.ragged_dot(hid, w2_t, sizes)
    contrib = c2.astype(jnp.float32) * tw.reshape(-1)[order][:, None]
    out = jnp.zeros((b, x.shape[1]), jnp.float32).at[token].add(contrib)
    return (out * C.ROUTED_SCALING_FACTOR).astype(jnp.bfloat16)


def jax_dense_layer(x, ids, tw, w13_t, w2_t):
    """Pure JAX, dense over all experts: every token through every expert, the routing weights
    (zero for experts not chosen) folded in before the second GEMM."""
    b = x.shape[0]
    dense_w = jnp.zeros((b, w13_t.shape[0]), jnp.float32).at[jnp.arange(b)[:, None], ids].add(tw)
    c1 = jnp.einsum("bh,ehn->ben", x, w13_t)
    hid = (silu_mul_f32(c1) * dense_w[..., None]).astype(jnp.bfloat16)
    out = jnp.einsum("bei,eih->bh", hid, w2_t, preferred_element_type=jnp.float32)
    return (out * C.ROUTED_SCALING_FACTOR).astype(jnp.bfloat16)


def run_pure_jax(args, shape, weights, problems, rows_out):
    w13_t, w2_t = dequantize_bf16_t(weights[0]), dequantize_bf16_t(weights[1])
    e, i = shape["experts"], shape["inter"]
    for name, fn in (("jax ragged_dot", jax_ragged_layer), ("jax dense", jax_dense_layer)):
        guard = C.PeerGuard(name, args.peer_limit_ms)
        single = jax.jit(fn)
        for row in rows_out:
            if name == "jax dense" and row["B"] * e * 2 * i * 6 > args.dense_max_gb * 1e9:
                row["peers"][name] = {"us": None, "note": f"skipped: intermediates over {args.dense_max_gb} GB"}
                continue
            insts = [(p["x"], p["ids"], p["weights"], w13_t, w2_t) for p in problems[row["B"]][:4]]

            def setup(insts=insts, fn=fn):
                return (lambda: single(*insts[0])), lambda: C.time_jax(
                    fn, insts, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms)[0]

            row["peers"][name] = guard.run(row["B"], setup)
            print(f"  B={row['B']}: {name} {C.fmt(row['peers'][name]['us'])} us", flush=True)


def report(rows_out, title, rates) -> None:
    headers = ["B", "rows", "hit", "layer us", "fast-accum layer us", "+router us", "gemms us", "outside %",
               "weight floor us", "compute floor us", "frac of floor"] + [f"{p} us" for p in PEERS]
    table = [[r["B"], r["rows"], f"{r['experts_hit']:.1f}", r["layer_us"], r.get("layer_fast_us"),
              r["layer_router_us"], r["gemms_us"], 100 * r["outside_gemms_share"], r["weight_floor_us"],
              r["compute_floor_us"], r["fraction"]]
             + [r["peers"].get(p, {}).get("us") for p in PEERS] for r in rows_out]
    notes = C.peer_notes(rows_out)
    notes.append("fast-accum layer: moe(..., fast_accumulation=True), timed where it changes the GEMM kernel "
                 f"(>= {CUDA_FAST_ACCUMULATION_ROWS_PER_EXPERT} rows per expert)")
    modes = {f"{k}: {v}" for r in rows_out for k, v in r.get("torch_mode", {}).items()}
    notes.append(f"weight floor = int4 + scale bytes of the experts hit in both GEMMs at the measured copy "
                 f"bandwidth {rates['copy_bytes_per_s'] / 1e12:.2f} TB/s; frac of floor = max(weight, compute "
                 "floor) / layer; outside % = share of the layer's time outside the two grouped GEMMs")
    notes.append("peers use one dense weight set (pure JAX: ours dequantized to bf16; torch: its own random "
                 "weights)" + (f"; torch layers ran as {', '.join(sorted(modes))}" if modes else ""))
    C.print_table(title, headers, table, notes)


def main() -> None:
    parser = C.base_parser(__doc__.splitlines()[0], default_limit_ms=200.0)
    parser.add_argument("--dense-max-gb", type=float, default=20.0,
                        help="skip the dense pure-JAX layer when its intermediates would exceed this")
    args, impl, env, rates, key = C.start(parser, "bench_moe.py")
    shape = layer_shape(args.dry_run)
    problems = {b: make_instances(jax.random.fold_in(key, 0), b, shape) for b in args.batches}
    rows_out, weights, scales = run_ours(args, impl, shape, jax.random.fold_in(key, 1), rates, problems, None)
    print(f"static scales: a1 = {scales[0]:.4g}, a2 = {scales[1]:.4g}")
    if not args.no_peers:  # torch first: JAX's memory pool keeps what the pure-JAX peers grow it to
        run_torch(args, shape, jax.random.fold_in(key, 2), problems, rows_out)
        C.free_torch()  # its weights are gone with the function's frame
        run_pure_jax(args, shape, weights, problems, rows_out)
    title = (f"MoE layer E={shape['experts']}, H={shape['hidden']}, I={shape['inter']}, top-{C.TOP_K}, "
             f"routed_scaling_factor {C.ROUTED_SCALING_FACTOR} ({impl})")
    report(rows_out, title, rates)
    C.write_json(args.json, {"environment": env, "rates": rates, "shape": shape, "top_k": C.TOP_K,
                             "a1_scale": scales[0], "a2_scale": scales[1], "rows": rows_out})
    xs = [r["B"] for r in rows_out]
    lines = {"ours": [r["layer_us"] for r in rows_out],
             "ours, fast accumulation": [r.get("layer_fast_us") for r in rows_out],
             "ours + router": [r["layer_router_us"] for r in rows_out],
             "ours, two GEMMs only": [r["gemms_us"] for r in rows_out]}
    lines.update({p: [r["peers"].get(p, {}).get("us") for r in rows_out] for p in PEERS})
    C.write_png(args.png, [{"title": title, "x": xs, "lines": lines,
                            "dashed": {"floor of both GEMMs": [r["floor_us"] for r in rows_out]}}],
                f"{env['device_kind']}: copy {rates['copy_bytes_per_s'] / 1e12:.2f} TB/s")


if __name__ == "__main__":
    main()
