"""Decode benchmark: L DeepSeek-V3 TP4 MoE layers in one jitted program, as a model runs them,
against the weight floor and against the seed's kernels, in one run.

For every B (tokens per step) it times, per layer:
  layer (router)   RMS norm, router (x @ gate [H, E] in f32, deepseek_topk with bias), moe,
                   residual add: what a decode step spends per MoE layer;
  layer (uniform)  the same with the routing fixed in advance (uniform random top-k, drawn
                   per layer), so the experts hit and therefore the floor are known;
  router + prep    deepseek_topk + route + gather_quantize alone;
  GEMM1, GEMM2     each grouped GEMM alone, over the L weight sets with the uniform routings;
and, on the same shapes and routings, the seed's GEMM1, GEMM2 and data prep (SGLang
sgl-kernel at PR #12921) and torch's fp8 grouped GEMM (torch._scaled_grouped_mm), each replayed
from a CUDA graph of one call per weight set, rotating over --peer-sets sets.

Floors: int4 + f32 scale bytes of the experts each layer actually hits (counted from the
routing the program used), at the copy bandwidth measured at the start of the run; the router
layer's floor adds the gate matrix [H, E] bf16.

Method: the L layers hold >= 20 GB of weights at L = 16, so the 60 MB L2 cannot serve a layer
from the previous one; weights are random bytes, made on the device. Each measurement compiles
two programs, one and P passes over the L layers (P such that the P-pass program does about
20 ms more work), and takes (T(P passes) - T(1 pass)) / ((P - 1) L) from wall-clock medians:
the fixed cost of dispatching a program cancels, and host jitter is small against the
difference.
The layer loop is a `lax.scan` over layer indices with the int4 weights passed whole and
read through `W4Weights.layer(i)` views ("view", as model code should scan a stack). The
other loops exist to show what happens otherwise: "scan" over layer-stacked arrays, where XLA
materialises each layer's weight slice before the custom call reads it (seen as temporary
memory of a layer's size), "scan-dsf" with xla_gpu_enable_dynamic_slice_fusion, and
"unrolled" over per-layer buffers. --loop auto takes the first that does not copy; the table
and JSON say which loop ran and the temporary memory of each.

  python3 benchmarks/bench_decode.py [--layers 16] [--batches 1,2,4,8,16,20,32,64,128]
      [--json PATH] [--png PATH] [--seed-dir DIR] [--no-peers] [--loop auto|view|scan|scan-dsf|unrolled]
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time

import timing  # first: the JAX allocator flag, the import path and the torch guard
import problems as P
import peers
import reports

import jax
import jax.numpy as jnp
import numpy as np

from w4afp8_jax import W4Weights, deepseek_topk, gather_quantize, grouped_gemm, moe, route

BATCHES = (1, 2, 4, 8, 16, 20, 32, 64, 128)
QUICK_BATCHES = (1, 20)
LOOPS = ("view", "scan", "scan-dsf", "unrolled")
COMPILER_OPTIONS = {"view": None, "scan": None, "scan-dsf": {"xla_gpu_enable_dynamic_slice_fusion": True},
                    "unrolled": None}
WEIGHTS = ("w13_packed", "w13_scales", "w2_packed", "w2_scales")
PROGRAMS = ("layer_router", "layer_uniform", "router_prep", "gemm1", "gemm2")
RMS_EPS = 1e-6


# --------------------------------------------------------------------------- the layer stack

def make_layers(key, shape, num_layers: int) -> dict:
    """Layer-stacked weights on the device: int4 experts (random bytes, tiled layout), the
    router's gate bf16 [L, H, E] and bias f32 [L, E], the RMS norm's gain f32 [L, H]."""
    n1, k1 = shape.gemm1()
    n2, k2 = shape.gemm2()
    keys = jax.random.split(key, 5)
    w13_packed, w13_scales = P.random_packed_scales(keys[0], (num_layers, shape.experts), n1, k1)
    w2_packed, w2_scales = P.random_packed_scales(keys[1], (num_layers, shape.experts), n2, k2)
    gate = (jax.random.normal(keys[2], (num_layers, shape.hidden, shape.experts), jnp.float32)
            / math.sqrt(shape.hidden)).astype(jnp.bfloat16)
    return {"w13_packed": w13_packed, "w13_scales": w13_scales, "w2_packed": w2_packed, "w2_scales": w2_scales,
            "gate": gate, "bias": jax.random.normal(keys[3], (num_layers, shape.experts), jnp.float32) * 0.01,
            "gamma": 1.0 + 0.1 * jax.random.normal(keys[4], (num_layers, shape.hidden), jnp.float32)}


def weights_of(p, name: str) -> W4Weights:
    """The layer's W4Weights: a `layer()` view of the stack (read in place) in the view loop,
    else the arrays the loop handed over."""
    w = W4Weights(p[f"{name}_packed"], p[f"{name}_scales"], P.GROUP_SIZE, layout="tiled")
    return w.layer(p["layer"]) if "layer" in p else w


def w13_of(p) -> W4Weights:
    return weights_of(p, "w13")


def w2_of(p) -> W4Weights:
    return weights_of(p, "w2")


def layer_args(weights, extra: dict, loop: str):
    """The layers argument of a program: for a scan, the stacked weights and the stacked
    per-layer extras (routing) in one dict; unrolled, weights is a list of per-layer dicts
    (separate buffers, so no slice of a stacked array feeds a kernel) and each gets its layer's
    extras."""
    if loop == "view":  # int4 weights stay whole (views); the scan slices the small per-layer arrays
        num_layers = weights["w13_packed"].shape[0]
        xs = {name: a for name, a in weights.items() if name not in WEIGHTS}
        return {"stack": {name: weights[name] for name in WEIGHTS},
                "xs": {**xs, **extra, "layer": jnp.arange(num_layers, dtype=jnp.int32)}}
    if loop != "unrolled":
        return {**weights, **extra}
    return [{**w, **{name: a[i] for name, a in extra.items()}} for i, w in enumerate(weights)]


def unstack(stacked: dict) -> list[dict]:
    num_layers = next(iter(stacked.values())).shape[0]
    return [{name: a[i] for name, a in stacked.items()} for i in range(num_layers)]


def over_layers(body, carry, layers, loop: str, collect: bool, unroll: int = 1):
    """carry after body(carry, layer) over every layer, and (if collect) the stacked second
    outputs of body; unroll: layers per iteration of the scan's loop."""
    def step(c, p):
        c, y = body(c, p)
        return c, (y if collect else None)
    if loop == "view":
        return jax.lax.scan(lambda c, p: step(c, {**layers["stack"], **p}), carry, layers["xs"], unroll=unroll)
    if loop != "unrolled":
        return jax.lax.scan(step, carry, layers, unroll=unroll)
    ys = []
    for p in layers:
        carry, y = step(carry, p)
        ys.append(y)
    return carry, (jnp.stack(ys) if collect else None)


def program(body, loop: str, passes: int, collect: bool = False, unroll: int = 1):
    """A function (carry, layers) -> (carry, ys) running `passes` passes over the layers; ys
    (when collect) of the last pass. The passes are a fori_loop with a static trip count (no
    host round trip per pass), so an unrolled layer stack is traced and compiled once."""
    def run(carry, layers):
        repeated = passes - 1 if collect else passes
        if repeated:
            carry = jax.lax.fori_loop(0, repeated, lambda _, c: over_layers(body, c, layers, loop, False, unroll)[0],
                                      carry)
        return over_layers(body, carry, layers, loop, True, unroll) if collect else (carry, None)
    return run


# --------------------------------------------------------------------------- the programs' bodies

def rms_norm(h, gamma):
    hf = h.astype(jnp.float32)
    return (hf * jax.lax.rsqrt(jnp.mean(hf * hf, axis=-1, keepdims=True) + RMS_EPS) * gamma).astype(jnp.bfloat16)


def router(x, p, shape):
    logits = jnp.dot(x, p["gate"], preferred_element_type=jnp.float32)
    return deepseek_topk(logits, p["bias"], top_k=shape.top_k, n_group=shape.n_group, topk_group=shape.topk_group)


def bodies(shape, impl: str, precision, a1: float, a2: float) -> dict:
    """name -> body(carry, layer params) -> (carry, ids or None)."""
    moe_kw = dict(a1_scale=a1, a2_scale=a2, routed_scaling_factor=shape.routed_scaling_factor,
                  precision=precision, implementation=impl)

    def layer_router(h, p):
        x = rms_norm(h, p["gamma"])
        topk_weights, ids = router(x, p, shape)
        return h + moe(x, ids, topk_weights, w13_of(p), w2_of(p), **moe_kw), ids

    def layer_uniform(h, p):
        x = rms_norm(h, p["gamma"])
        return h + moe(x, p["ids"], p["topk_weights"], w13_of(p), w2_of(p), **moe_kw), None

    def router_prep(carry, p):  # carry: (x, rows of the previous layer, offsets); x passes through
        x = carry[0]
        _, ids = router(x, p, shape)
        routing = route(ids, shape.experts, implementation=impl)
        rows, _ = gather_quantize(x, routing.positions, a1, implementation=impl)
        return (x, rows, routing.group_offsets), None

    def gemm(which, carry, p):  # carry: (lhs, output of the previous layer); lhs passes through
        lhs = carry[0]
        w = w13_of(p) if which == "gemm1" else w2_of(p)
        scale = a1 if which == "gemm1" else a2
        return (lhs, grouped_gemm(lhs, scale, w, p["offsets"], precision=precision, implementation=impl)), None

    return {"layer_router": layer_router, "layer_uniform": layer_uniform, "router_prep": router_prep,
            "gemm1": functools.partial(gemm, "gemm1"), "gemm2": functools.partial(gemm, "gemm2")}


# --------------------------------------------------------------------------- compiling and timing

def compile_program(body, loop: str, passes: int, carry, layers, collect: bool = False, unroll: int = 1):
    lowered = jax.jit(program(body, loop, passes, collect, unroll)).lower(carry, layers)
    return lowered.compile(COMPILER_OPTIONS[loop]) if COMPILER_OPTIONS[loop] else lowered.compile()


def temp_bytes(compiled) -> int | None:
    """The compiled program's temporary memory (None when the backend does not say)."""
    try:
        return int(compiled.memory_analysis().temp_size_in_bytes)
    except Exception:  # noqa: BLE001 - memory_analysis is optional per backend
        return None


def choose_loop(requested: str, body, carry, stacked: dict, extra: dict, slice_bytes: int,
                dry_run: bool) -> tuple[str, dict]:
    """The loop to run: the requested one, or with "auto" the first of scan, scan-dsf and
    unrolled whose compiled one-pass program does not copy the weights (probed at the smallest
    B, where the activations' temporaries are far below slice_bytes)."""
    notes = {}
    for loop in (LOOPS if requested == "auto" else (requested,)):
        if loop == "unrolled":  # nothing to probe: no slices
            return loop, notes
        try:
            compiled = compile_program(body, loop, 1, carry, layer_args(stacked, extra, loop))
        except Exception as err:  # noqa: BLE001 - e.g. dynamic-slice fusion refusing the program
            if requested != "auto":
                raise
            notes[loop] = {"error": timing.error_text(err)}
            print(f"  loop {loop}: does not compile ({notes[loop]['error']})", flush=True)
            continue
        t = temp_bytes(compiled)
        copies = t is not None and t >= slice_bytes // 2
        notes[loop] = {"temp_bytes": t, "copies_weights": copies}
        print(f"  loop {loop}: temporary memory {reports.fmt(None if t is None else t / 2**20)} MiB"
              f"{' (copies the weight slices)' if copies else ''}", flush=True)
        if not copies or dry_run or requested != "auto":
            return loop, notes
    raise AssertionError("unreachable: the last candidate returns")


SLOPE_EXTRA_S = 0.02  # work the longer program adds to the one-pass one: host jitter is then ~1% of it


def time_per_layer(body, loop: str, carry, layers, num_layers: int, min_reps: int, collect: bool = False,
                   unroll: int = 1):
    """Seconds per layer (slope between the one-pass program and one of P passes, P chosen so
    the difference is about SLOPE_EXTRA_S: at B = 1 one pass is ~1 ms, and a one-pass
    difference left the slope to host jitter), details, and the one-pass program's collected
    outputs."""
    def measure(passes: int):
        compiled = compile_program(body, loop, passes, carry, layers, collect, unroll)
        out = jax.block_until_ready(compiled(carry, layers))  # warm up
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(carry, layers))
        once = time.perf_counter() - t0
        reps = int(min(200, max(min_reps, math.ceil(0.2 / max(once, 1e-6)))))
        return timing.wall_median(lambda: jax.block_until_ready(compiled(carry, layers)), reps), \
            temp_bytes(compiled), out[1]

    t_1, temp_1, outputs = measure(1)
    passes = int(min(32, max(2, 1 + math.ceil(SLOPE_EXTRA_S / max(t_1, 1e-6)))))
    t_p, temp_p, _ = measure(passes)
    seconds, details = timing.slope(t_1, t_p, num_layers, m=passes * num_layers)
    details.update(temp_bytes_1=temp_1, temp_bytes_p=temp_p)
    return seconds, details, outputs


# --------------------------------------------------------------------------- peers

def make_peer_weights(args, shape, key) -> dict:
    """Weight sets of the seed and of torch's fp8 grouped GEMM, made once (None when absent)."""
    out = {"seed": None, "seed_note": None, "torch": None, "torch_note": None}
    if args.no_peers or args.dry_run:
        out["seed_note"] = out["torch_note"] = "not run (--no-peers or --dry-run)"
        return out
    if not timing.torch_ok():
        out["seed_note"] = out["torch_note"] = "n/a: " + timing.TORCH_UNAVAILABLE
        return out
    torch = timing.torch
    gen = torch.Generator(device="cuda").manual_seed(int(jax.random.randint(key, (), 0, 2**31 - 1)))
    try:
        seed = peers.SeedKernels(peers.seed_dir(args), shape)
        out["seed"] = {"kernels": seed, "sets": {g: seed.weight_sets(g, args.peer_sets, gen) for g in seed.sizes}}
        print(f"seed: {seed.library} ({seed.build_info})", flush=True)
    except Exception as err:  # noqa: BLE001 - a missing peer is reported, not fatal
        out["seed_note"] = "n/a: " + timing.error_text(err)
        print(f"seed: {out['seed_note']}", flush=True)
    try:
        out["torch"] = {g: [peers.torch_weights("fp8", shape.experts, n, k, gen) for _ in range(args.peer_sets)]
                        for g, (n, k) in P.gemm_shapes(shape).items()}
    except Exception as err:  # noqa: BLE001
        out["torch_note"] = "n/a: " + timing.error_text(err)
    timing.free_torch()
    return out


def time_peers(peer_weights, shape, ids, group_offsets, iters: int) -> dict:
    """Microseconds per call of the seed's GEMM1, GEMM2 and data prep and of torch's fp8 grouped
    GEMMs on the routing ids [B, k] (layer 0's uniform routing)."""
    res = {}
    for name, note in (("seed", peer_weights["seed_note"]), ("torch", peer_weights["torch_note"])):
        if note:
            res.update({f"{name} {what}": {"us": None, "note": note}
                        for what in (("gemm1", "gemm2", "prep") if name == "seed" else ("fp8 gemm1", "fp8 gemm2"))})
    if peer_weights["seed"] is None and peer_weights["torch"] is None:
        return res
    torch = timing.torch
    rows = ids.size
    ids_t = peers.to_torch(ids).to(torch.int32)
    activations = {g: torch.randn(rows, k, device="cuda", dtype=torch.bfloat16) for g, (n, k) in P.gemm_shapes(shape).items()}
    if peer_weights["seed"] is not None:
        seed, sets = peer_weights["seed"]["kernels"], peer_weights["seed"]["sets"]
        try:
            routing = seed.routing(ids_t)
            res["seed prep matches"] = seed.check_routing(routing, group_offsets)
            res["seed prep"] = {"us": timing.time_cuda_graph([routing["prep"]] * 4, iters) * 1e6}
            a_scale = torch.full((1,), 0.01, device="cuda", dtype=torch.float32)
            for gemm, (n, k) in seed.sizes.items():
                x = activations[gemm].to(torch.float8_e4m3fn)
                c = torch.empty(rows, n, device="cuda", dtype=torch.bfloat16)
                fns = [seed.gemm(gemm, c, x, ws, a_scale, routing) for ws in sets[gemm]]
                res[f"seed {gemm}"] = {"us": timing.time_cuda_graph(fns, iters) * 1e6}
        except Exception as err:  # noqa: BLE001
            res.setdefault("seed gemm1", {"us": None, "note": "n/a: " + timing.error_text(err)})
            timing.free_torch()
    if peer_weights["torch"] is not None:
        row_ends = peers.to_torch(np.asarray(group_offsets)[1:]).to(torch.int32)
        for gemm, sets in peer_weights["torch"].items():
            try:
                fns = [peers.torch_grouped_gemm(activations[gemm], w, s, row_ends) for w, s in sets]
                res[f"torch fp8 {gemm}"] = {"us": timing.time_cuda_graph(fns, iters) * 1e6}
            except Exception as err:  # noqa: BLE001
                res[f"torch fp8 {gemm}"] = {"us": None, "note": "n/a: " + timing.error_text(err)}
                timing.free_torch()
    return res


# --------------------------------------------------------------------------- one B

def uniform_routing(key, shape, num_layers: int, tokens: int) -> dict:
    """Per layer: uniform random ids [L, B, k], topk weights [L, B, k] and group offsets [L, E+1]."""
    k_ids, k_w = jax.random.split(key)
    ids = jnp.stack([P.uniform_topk_ids(k, tokens, shape.experts, shape.top_k)
                     for k in jax.random.split(k_ids, num_layers)])
    offsets = np.zeros((num_layers, shape.experts + 1), np.int32)
    for i, layer_ids in enumerate(np.asarray(ids)):
        offsets[i, 1:] = np.cumsum(np.bincount(layer_ids.ravel(), minlength=shape.experts))
    return {"ids": ids, "topk_weights": jnp.stack([P.random_topk_weights(k, tokens, shape.top_k)
                                                   for k in jax.random.split(k_w, num_layers)]),
            "offsets": jnp.asarray(offsets)}


def mean_hit(ids, shape) -> float:
    return float(np.mean([P.experts_hit(layer_ids, shape.experts) for layer_ids in np.asarray(ids)]))


def run_batch(args, shape, b: int, key, weights, loop: str, body_of: dict, rates: dict, peer_weights) -> dict:
    """Every measurement at B = b tokens; weights: stacked dict, or a list of per-layer dicts
    for the unrolled loop."""
    num_layers = args.layers
    n1, k1 = shape.gemm1()
    n2, k2 = shape.gemm2()
    rows = b * shape.top_k
    keys = jax.random.split(key, 4)
    uniform = uniform_routing(keys[0], shape, num_layers, b)
    h0 = jax.random.normal(keys[1], (b, shape.hidden), jnp.bfloat16)
    bytes_per_expert = P.weight_bytes_per_expert(n1, k1) + P.weight_bytes_per_expert(n2, k2)
    gate_bytes = shape.hidden * shape.experts * 2
    bw = rates["copy_bytes_per_s"]
    row = {"B": b, "rows": rows, "expected_hit": P.expected_experts_hit(b, shape.experts, shape.top_k)}

    layers = layer_args(weights, uniform, loop)
    carries = {
        "layer_router": h0, "layer_uniform": h0,
        "router_prep": (h0, jnp.zeros((rows, shape.hidden), P.FP8), jnp.zeros((shape.experts + 1,), jnp.int32)),
        "gemm1": (P.random_fp8(keys[2], rows, k1), jnp.zeros((rows, n1), jnp.bfloat16)),
        "gemm2": (P.random_fp8(keys[3], rows, k2), jnp.zeros((rows, n2), jnp.bfloat16)),
    }
    for name in PROGRAMS:
        # Only the layer programs chain each layer's output into the next: unrolled, the other
        # programs' per-layer outputs (all but the last of an iteration) are dead code to XLA.
        seconds, details, ys = time_per_layer(body_of[name], loop, carries[name], layers, num_layers, args.reps,
                                              collect=name == "layer_router",
                                              unroll=args.unroll if name.startswith("layer") else 1)
        row[f"{name}_us"], row[f"{name}_timing"] = seconds * 1e6, details
        if max(details["temp_bytes_1"] or 0, details["temp_bytes_p"] or 0) >= args.copy_alarm_bytes:
            print(f"  WARNING B={b} {name}: {max(details['temp_bytes_1'] or 0, details['temp_bytes_p'] or 0) / 2**20:.0f}"
                  " MiB of temporaries: the program may copy weights (time includes the copies)", flush=True)
        if name == "layer_router":
            row["router_hit"] = mean_hit(ys, shape)
    row["uniform_hit"] = mean_hit(uniform["ids"], shape)
    row["layer_uniform_floor_us"] = row["uniform_hit"] * bytes_per_expert / bw * 1e6
    row["layer_router_floor_us"] = (row["router_hit"] * bytes_per_expert + gate_bytes) / bw * 1e6
    for gemm, (n, k) in P.gemm_shapes(shape).items():
        row[f"{gemm}_floor_us"] = row["uniform_hit"] * P.weight_bytes_per_expert(n, k) / bw * 1e6
    for name in ("layer_uniform", "layer_router", "gemm1", "gemm2"):
        row[f"{name}_x_floor"] = row[f"{name}_us"] / row[f"{name}_floor_us"]
    row["peers"] = time_peers(peer_weights, shape, np.asarray(uniform["ids"][0]), np.asarray(uniform["offsets"][0]),
                              args.peer_iters) if peer_weights is not None else {}
    seed_sum = [row["peers"].get(f"seed {g}", {}).get("us") for g in ("gemm1", "gemm2")]
    row["seed_over_ours"] = (sum(seed_sum) / (row["gemm1_us"] + row["gemm2_us"])) if all(seed_sum) else None
    print(f"  B={b}: layer {row['layer_uniform_us']:.1f} us uniform ({row['layer_uniform_x_floor']:.2f}x floor), "
          f"{row['layer_router_us']:.1f} us with router; GEMM1 {row['gemm1_us']:.1f}, GEMM2 {row['gemm2_us']:.1f} us"
          + (f"; seed GEMM1+GEMM2 / ours {row['seed_over_ours']:.2f}" if row["seed_over_ours"] else ""), flush=True)
    return row


# --------------------------------------------------------------------------- output

def tables(rows, args, shape, rates, loop) -> list[str]:
    bw = rates["copy_bytes_per_s"] / 1e12
    layer_headers = ["B", "hit", "uniform us", "floor us", "x floor", "router hit", "router us", "floor us",
                     "x floor", "router+prep us"]
    layer_rows = [[r["B"], r["uniform_hit"], r["layer_uniform_us"], r["layer_uniform_floor_us"],
                   r["layer_uniform_x_floor"], r["router_hit"], r["layer_router_us"], r["layer_router_floor_us"],
                   r["layer_router_x_floor"], r["router_prep_us"]] for r in rows]
    layer_notes = [f"per layer, L = {args.layers} layers of {shape.name} in one jitted program ({loop} loop); "
                   "uniform: routing fixed in advance; router: RMS norm + x @ gate + deepseek_topk + moe + residual",
                   f"floor: int4 + f32 scale bytes of the experts hit (mean over layers) at the measured copy "
                   f"bandwidth {bw:.2f} TB/s; the router layer's floor adds the gate matrix",
                   "router+prep: deepseek_topk + route + gather_quantize per layer"]

    def peer(r, name):
        return r["peers"].get(name, {}).get("us")

    gemm_headers = ["B", "GEMM1 us", "floor us", "frac", "GEMM2 us", "floor us", "frac", "seed G1 us", "seed G2 us",
                    "seed prep us", "seed/ours G1+G2", "torch fp8 G1 us", "torch fp8 G2 us"]
    gemm_rows = [[r["B"], r["gemm1_us"], r["gemm1_floor_us"], 1 / r["gemm1_x_floor"], r["gemm2_us"],
                  r["gemm2_floor_us"], 1 / r["gemm2_x_floor"], peer(r, "seed gemm1"), peer(r, "seed gemm2"),
                  peer(r, "seed prep"), r["seed_over_ours"], peer(r, "torch fp8 gemm1"), peer(r, "torch fp8 gemm2")]
                 for r in rows]
    gemm_notes = [f"ours: each grouped GEMM alone, {loop} loop over the L weight sets (uniform routing per layer), "
                  f"precision {args.precision}; frac = weight floor / time",
                  f"peers: CUDA-graph replays of one call per weight set over {args.peer_sets} sets, routing of "
                  "layer 0; seed/ours = (seed GEMM1 + GEMM2) / (ours GEMM1 + GEMM2)"]
    gemm_notes += reports.peer_notes(rows)
    mismatched = [r["B"] for r in rows if r["peers"].get("seed prep matches") is False]
    if mismatched:
        gemm_notes.append(f"WARNING: the seed's data prep offsets differ from ours at B={mismatched}")
    return [reports.format_table(f"Decode, per MoE layer ({shape.name}, {args.precision})", layer_headers,
                                 layer_rows, layer_notes),
            reports.format_table("Decode, each grouped GEMM alone and the peers (us per call)", gemm_headers,
                                 gemm_rows, gemm_notes)]


def plot(rows, args, env, rates, shape) -> None:
    xs = [r["B"] for r in rows]

    def col(key):
        return [r.get(key) for r in rows]

    def peer(name):
        return [r["peers"].get(name, {}).get("us") for r in rows]

    seed_layer = [None if None in (g1, g2) else g1 + g2 + (pp or 0.0)
                  for g1, g2, pp in zip(peer("seed gemm1"), peer("seed gemm2"), peer("seed prep"))]
    panels = [
        {"title": f"per layer, L = {args.layers}", "x": xs,
         "lines": {"ours, uniform routing": col("layer_uniform_us"), "ours, with router": col("layer_router_us"),
                   "ours, GEMM1 + GEMM2": [a + b for a, b in zip(col("gemm1_us"), col("gemm2_us"))],
                   "seed GEMM1 + GEMM2 + prep": seed_layer},
         "dashed": {"weight floor (uniform)": col("layer_uniform_floor_us")}},
    ]
    for gemm, (n, k) in P.gemm_shapes(shape).items():
        panels.append({"title": f"{gemm.upper()} [rows, {k}] x [{shape.experts}, {k} -> {n}]", "x": xs,
                       "lines": {"ours": col(f"{gemm}_us"), "seed": peer(f"seed {gemm}"),
                                 "torch fp8 grouped": peer(f"torch fp8 {gemm}")},
                       "dashed": {"weight floor": col(f"{gemm}_floor_us")}})
    reports.write_png(args.png, panels, f"{env['device_kind']}: decode, copy {rates['copy_bytes_per_s'] / 1e12:.2f} TB/s")


def main() -> None:
    parser = reports.base_parser(__doc__.split("\n\n")[0], BATCHES, QUICK_BATCHES)
    parser.add_argument("--layers", type=int, default=None, help="layers L (default 16; 2 with --dry-run)")
    parser.add_argument("--precision", choices=("default", "highest"), default="default",
                        help="precision= of moe and grouped_gemm: default (None) or jax.lax.Precision.HIGHEST")
    parser.add_argument("--loop", choices=("auto",) + LOOPS, default="auto",
                        help="how the layers are looped over (see the module docstring)")
    parser.add_argument("--unroll", type=int, default=1, help="layers per iteration of the layer programs' scan "
                        "(lax.scan unroll=); the GEMM and router+prep programs always use 1, since unrolled, "
                        "XLA drops the layers whose outputs only the next layer overwrites")
    parser.add_argument("--reps", type=int, default=5, help="least wall-clock repetitions per program (more for "
                        "short programs, up to 0.2 s each)")
    parser.add_argument("--peer-sets", type=int, default=4, help="weight sets the peers rotate over (>= 3)")
    parser.add_argument("--peer-iters", type=int, default=30, help="CUDA-graph replays per peer measurement")
    peers.add_seed_dir_arg(parser)
    args, impl, env, rates, key = reports.start(parser, "bench_decode.py", fp8_rate=False)
    if args.layers is None:
        args.layers = 2 if args.dry_run else 16
    if args.layers < 1 or args.peer_sets < 3 or args.unroll < 1:
        parser.error("--layers and --unroll must be >= 1 and --peer-sets >= 3")
    shape = P.shape_for(args.dry_run)
    precision = None if args.precision == "default" else jax.lax.Precision.HIGHEST

    t0 = time.perf_counter()
    weights = jax.block_until_ready(make_layers(jax.random.fold_in(key, 0), shape, args.layers))
    total = sum(a.nbytes for a in weights.values())
    print(f"made {args.layers} layers of {shape.name} weights, {total / 1e9:.1f} GB, in "
          f"{time.perf_counter() - t0:.1f} s", flush=True)
    if total < 20e9 and not args.dry_run:
        print(f"WARNING: {total / 1e9:.1f} GB of weights is under 20 GB: use --layers >= 14 so no layer's weights "
              "stay in the L2", flush=True)
    calibration_x = jax.random.normal(jax.random.fold_in(key, 1), (64, shape.hidden), jnp.bfloat16)
    layer0 = W4Weights(weights["w13_packed"][0], weights["w13_scales"][0], P.GROUP_SIZE, layout="tiled")
    a1, a2 = P.calibrate_scales(jax.random.fold_in(key, 2), shape, layer0, impl, x=calibration_x)
    del layer0
    print(f"static scales: a1 = {a1:.4g}, a2 = {a2:.4g}", flush=True)
    body_of = bodies(shape, impl, precision, a1, a2)

    # The loop: decided once, on the uniform layer program at the smallest B.
    b0 = min(args.batches)
    probe = uniform_routing(jax.random.fold_in(key, 3), shape, args.layers, b0)
    smallest_slice = min(weights[name].nbytes // args.layers for name in ("w13_packed", "w13_scales", "w2_packed",
                                                                         "w2_scales"))
    loop, loop_notes = choose_loop(args.loop, body_of["layer_uniform"],
                                   jax.random.normal(jax.random.fold_in(key, 4), (b0, shape.hidden), jnp.bfloat16),
                                   weights, probe, smallest_slice, args.dry_run)
    args.copy_alarm_bytes = float("inf") if args.dry_run else smallest_slice // 2
    print(f"layer loop: {loop}, unroll {args.unroll}", flush=True)
    if loop == "unrolled":
        weights = unstack(weights)  # separate per-layer buffers, made once; the stack is freed
    peer_weights = make_peer_weights(args, shape, jax.random.fold_in(key, 5))

    rows = [run_batch(args, shape, b, jax.random.fold_in(key, 100 + b), weights, loop, body_of, rates, peer_weights)
            for b in args.batches]
    for text in tables(rows, args, shape, rates, loop):
        print(text)
    reports.write_json(args.json, {"environment": env, "rates": rates, "shape": dataclasses.asdict(shape),
                                   "layers": args.layers, "weight_bytes": total, "precision": args.precision,
                                   "loop": loop, "unroll": args.unroll, "loop_probe": loop_notes, "a1_scale": a1, "a2_scale": a2,
                                   "seed_library": (peer_weights["seed"]["kernels"].library
                                                    if peer_weights["seed"] else peer_weights["seed_note"]),
                                   "rows": rows})
    plot(rows, args, env, rates, shape)


if __name__ == "__main__":
    main()
