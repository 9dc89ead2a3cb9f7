"""One GPU vs expert parallelism vs tensor parallelism on all visible GPUs, at DeepSeek-V3 TP1
expert shapes (E = 256, H = 7168, I = 2048, top-8, routed_scaling_factor 2.5, static a1/a2
scales), per layer as in a model.

Modes (P = number of GPUs):
  one_gpu  `moe` on GPU 0, all experts there;
  ep       `moe_expert_parallel(dispatch="all_gather")`: E/P experts per GPU, tokens sharded
           over the GPUs (replicated when P does not divide B), all-gathered, outputs
           reduce-scattered (psum when replicated) in f32;
  ep_a2a   `moe_expert_parallel(dispatch="all_to_all")`: the static [P, B/P*k, H] send buffer
           exchanged both ways (only when P divides B);
  tp       `moe_tensor_parallel`: I/P of every expert per GPU, tokens replicated, f32 psum.
Per B and mode: the time per layer, the time of the mode's collectives alone at the same
shapes (same program structure, the collectives chained through their outputs, plus the
dtype conversions between them), the speedup over one GPU and the scaling efficiency
(speedup / P).

Method: L layers of random int4 bytes made on the devices (one layer is 5.6 GB for one GPU;
L = 4 by default, --layers), each layer its own arrays and its own routing (DeepSeek-V3's
grouped top-k of random logits, so EP sees the model's group-limited spread), the layers
unrolled in the program (a scan would dynamic-slice the stacked weights, which XLA may
copy before the custom calls read them), inside a while loop over passes. Time per layer =
(T(2n passes) - T(n passes)) / (n L) from wall-clock medians around jax.block_until_ready
(time.perf_counter): the fixed cost of dispatching a program cancels.

  NCCL_NVLS_ENABLE=0 python3 benchmarks/bench_multi_gpu.py [--json PATH] [--layers 4]
      [--batches 1,4,16,64,256,1024,4096] [--modes one_gpu,ep,ep_a2a,tp] [--precision default|highest]
  --dry-run: a small layer on 2 simulated CPU devices with the reference path (checks the script).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast off on this workplace's machines
if "--dry-run" in sys.argv:  # simulated devices must be asked for before JAX starts
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2").strip()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as PS, SingleDeviceSharding  # noqa: E402

import w4afp8_jax as w4  # noqa: E402
from w4afp8_jax.shapes import DEEPSEEK_V3, MoEShape  # noqa: E402

BATCHES = (1, 4, 16, 64, 256, 1024, 4096)
MODES = ("one_gpu", "ep", "ep_a2a", "tp")
A1_SCALE, A2_SCALE = 4.0 / 448, 1.0 / 448  # static, as from a checkpoint; saturation keeps values finite
DRY_SHAPE = MoEShape("dry-run", experts=16, hidden=256, intermediate=512, top_k=4, n_group=4, topk_group=2,
                     routed_scaling_factor=2.5)


# ---- programs -------------------------------------------------------------------------------

def passes_program(step, layers: list):
    """jit(reps, carry, layers) -> carry after `reps` passes of `step` over the layers (unrolled)."""
    def run(reps, carry, layer_args):
        def one_pass(_, c):
            for args in layer_args:
                c = step(c, *args)
            return c
        return jax.lax.fori_loop(0, reps, one_pass, carry)
    return jax.jit(run), layers


def seconds_per_layer(program, carry, layers, num_layers: int, repeats: int, target_s: float) -> float:
    def timed(n):
        start = time.perf_counter()
        jax.block_until_ready(program(jnp.int32(n), carry, layers))
        return time.perf_counter() - start

    timed(1)  # compile, NCCL set-up, first touch
    n = max(1, min(64, math.ceil(target_s / max(timed(1), 1e-6))))
    samples = []
    for _ in range(repeats):
        t1, t2 = timed(n), timed(2 * n)
        samples.append((t2 - t1) / (n * num_layers))
    return statistics.median(samples)


# ---- data -----------------------------------------------------------------------------------

def random_weights(key, e, n, k, sharding):
    """W4Weights-shaped random arrays (packed uint8 [E, N, K/2], f32 scales) made on the device(s)."""
    def make(key):
        kp, ks = jax.random.split(key)
        packed = jax.random.bits(kp, (e, n, k // 2), jnp.uint8)
        scales = jax.random.normal(ks, (e, n, k // 128), jnp.float32) * 0.005
        return packed, scales
    return jax.jit(make, out_shardings=(sharding, sharding))(key)


def layer_weights(key, shape: MoEShape, mode: str, mesh: Mesh, num_layers: int, layout: str):
    """Per layer (w13 packed, w13 scales, w2 packed, w2 scales), placed for the mode. Random
    bytes are random in any arrangement, so TP's are made directly in shard_tensor_parallel's."""
    e, h, i, p = shape.experts, shape.hidden, shape.intermediate, mesh.size
    if mode == "one_gpu":
        place, dims13, dims2 = SingleDeviceSharding(mesh.devices.flat[0]), (e, 2 * i, h), (e, h, i)
    elif mode == "tp":
        place, dims13, dims2 = NamedSharding(mesh, PS(None, "x")), (e, 2 * i, h), (e, p * h, i // p)
    else:
        place, dims13, dims2 = NamedSharding(mesh, PS("x")), (e, 2 * i, h), (e, h, i)
    out = []
    for key_l in jax.random.split(key, num_layers):
        k13, k2 = jax.random.split(key_l)
        out.append((*random_weights(k13, *dims13, place), *random_weights(k2, *dims2, place)))
    return out


def routing(key, shape: MoEShape, b: int, num_layers: int):
    """Per layer (topk_ids int32 [B, k], topk_weights f32 [B, k]) from DeepSeek-V3's grouped
    top-k of random logits and bias, on the host."""
    out = []
    for key_l in jax.random.split(key, num_layers):
        kl, kb = jax.random.split(key_l)
        logits = jax.random.normal(kl, (b, shape.experts), jnp.float32)
        bias = jax.random.normal(kb, (shape.experts,), jnp.float32) * 0.1
        tw, ids = w4.deepseek_topk(logits, bias, top_k=shape.top_k, n_group=shape.n_group,
                                   topk_group=shape.topk_group)
        out.append((np.asarray(ids, np.int32), np.asarray(tw, np.float32)))
    return out


# ---- modes ----------------------------------------------------------------------------------

def token_sharded(mode: str, b: int, p: int) -> bool:
    return mode in ("ep", "ep_a2a") and b % p == 0


def layer_step(mode: str, b: int, mesh: Mesh, shape: MoEShape, layout: str, precision, impl: str):
    common = dict(a1_scale=A1_SCALE, a2_scale=A2_SCALE, routed_scaling_factor=shape.routed_scaling_factor,
                  precision=precision, implementation=impl)

    def step(x, ids, tw, p13, s13, p2, s2):
        w13, w2 = w4.W4Weights(p13, s13, 128, layout), w4.W4Weights(p2, s2, 128, layout)
        if mode == "one_gpu":
            return w4.moe(x, ids, tw, w13, w2, **common)
        if mode == "tp":
            return w4.moe_tensor_parallel(x, ids, tw, w13, w2, mesh=mesh, axis_name="x", **common)
        dispatch = "all_to_all" if mode == "ep_a2a" else "all_gather"
        return w4.moe_expert_parallel(x, ids, tw, w13, w2, mesh=mesh, axis_name="x", dispatch=dispatch,
                                      token_sharded=token_sharded(mode, b, mesh.size), **common)
    return step


def comm_step(mode: str, b: int, mesh: Mesh, shape: MoEShape):
    """(step, carry) running the mode's collectives of one layer, chained through the carry."""
    p, h, k = mesh.size, shape.hidden, shape.top_k
    f32 = jnp.float32
    if mode == "ep_a2a":  # fp8 rows and their ids out, bf16 rows back, [P, B/P*k] per device
        rows = (b // p) * k * p
        def body(q, ids, back):
            swap = lambda a: jax.lax.all_to_all(a.reshape(p, -1, *a.shape[1:]), "x", 0, 0, tiled=True).reshape(a.shape)
            return swap(q), swap(ids), swap(back)
        spec = PS("x")
        carry = (jnp.zeros((p * rows, h), jnp.float8_e4m3fn), jnp.zeros((p * rows,), jnp.int32),
                 jnp.zeros((p * rows, h), jnp.bfloat16))
        in_specs = (spec, spec, spec)
        out_specs = (spec, spec, spec)
    elif token_sharded(mode, b, p):  # all_gather of the tokens, f32 reduce-scatter of the shares
        def body(x):
            full = jax.lax.all_gather(x, "x", axis=0, tiled=True).astype(f32)
            return jax.lax.psum_scatter(full, "x", scatter_dimension=0, tiled=True).astype(jnp.bfloat16)
        carry, in_specs, out_specs = (jnp.ones((b, h), jnp.bfloat16),), (PS("x"),), PS("x")
    else:  # tokens replicated: an f32 psum of the shares
        def body(x):
            return jax.lax.psum(x.astype(f32), "x").astype(jnp.bfloat16)
        carry, in_specs, out_specs = (jnp.ones((b, h), jnp.bfloat16),), (PS(),), PS()
    mapped = jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_specs)
    if len(carry) == 1:
        step = lambda c, *layer: mapped(c)
        carry = jax.device_put(carry[0], NamedSharding(mesh, in_specs[0]))
    else:
        step = lambda c, *layer: mapped(*c)
        carry = jax.device_put(carry, NamedSharding(mesh, PS("x")))
    return step, carry


# ---- run ------------------------------------------------------------------------------------

def run(args) -> dict:
    dry = args.dry_run
    devices = jax.devices("cpu")[:2] if dry else jax.devices()
    p = len(devices)
    shape = DRY_SHAPE if dry else DEEPSEEK_V3
    impl = "reference" if dry else "cuda"
    layout = "checkpoint" if dry else "tiled"
    precision = jax.lax.Precision.HIGHEST if args.precision == "highest" else None
    mesh = Mesh(np.array(devices), ("x",))
    if p < 2:
        print(f"note: {p} device(s): the multi-GPU modes run on a 1-device mesh", file=sys.stderr)
    key = jax.random.key(0)
    routings = {b: routing(jax.random.fold_in(key, b), shape, b, args.layers) for b in args.batches}
    rows = []
    for mode in args.modes:
        weights = layer_weights(jax.random.fold_in(key, 1000), shape, mode, mesh, args.layers, layout)
        layers = program = None
        for b in args.batches:
            if mode == "ep_a2a" and b % p:
                continue
            sharded = token_sharded(mode, b, p)
            if mode == "one_gpu":
                tokens = SingleDeviceSharding(devices[0])
            else:
                tokens = NamedSharding(mesh, PS("x") if sharded else PS())
            layers = [(*jax.device_put(r, tokens), *w) for r, w in zip(routings[b], weights)]
            x = jax.device_put(jax.random.normal(jax.random.fold_in(key, b), (b, shape.hidden), jnp.bfloat16), tokens)
            program, layers = passes_program(layer_step(mode, b, mesh, shape, layout, precision, impl), layers)
            layer_s = seconds_per_layer(program, x, layers, args.layers, args.repeats, args.target_s)
            comm_s = None
            if mode != "one_gpu" and p > 1:
                step, carry = comm_step(mode, b, mesh, shape)
                comm_program, _ = passes_program(step, [()] * args.layers)
                comm_s = seconds_per_layer(comm_program, carry, [()] * args.layers, args.layers, args.repeats,
                                           args.target_s)
            rows.append(dict(mode=mode, b=b, devices=1 if mode == "one_gpu" else p, tokens_sharded=sharded,
                             layer_us=layer_s * 1e6, comm_us=None if comm_s is None else comm_s * 1e6))
            print(f"{mode:8s} B={b:5d} layer {layer_s * 1e6:9.1f} us"
                  + ("" if comm_s is None else f"  collectives {comm_s * 1e6:8.1f} us"), flush=True)
        del weights, layers, program  # free this mode's weights before the next mode makes its own
    one = {r["b"]: r["layer_us"] for r in rows if r["mode"] == "one_gpu"}
    for r in rows:
        if r["b"] in one and r["layer_us"] > 0:
            r["speedup"] = one[r["b"]] / r["layer_us"]
            r["efficiency"] = r["speedup"] / r["devices"]
    return dict(
        config=dict(shape=shape.name, experts=shape.experts, hidden=shape.hidden, intermediate=shape.intermediate,
                    top_k=shape.top_k, layers=args.layers, precision=args.precision, devices=[str(d) for d in devices],
                    device_kind=devices[0].device_kind, jax=jax.__version__, implementation=impl,
                    nccl_nvls_enable=os.environ.get("NCCL_NVLS_ENABLE"), repeats=args.repeats),
        rows=rows)


def table(result: dict) -> str:
    cfg = result["config"]
    lines = [f"{cfg['shape']} (E={cfg['experts']}, H={cfg['hidden']}, I={cfg['intermediate']}, top-{cfg['top_k']}), "
             f"{len(cfg['devices'])} x {cfg['device_kind']}, {cfg['layers']} layers, precision {cfg['precision']}; "
             "us per layer",
             "",
             "| B | mode | tokens | layer us | collectives us | speedup vs 1 GPU | efficiency |",
             "|---:|---|---|---:|---:|---:|---:|"]
    fmt = lambda v, f: "" if v is None else format(v, f)
    for r in sorted(result["rows"], key=lambda r: (r["b"], MODES.index(r["mode"]))):
        tokens = "one GPU" if r["mode"] == "one_gpu" else ("sharded" if r["tokens_sharded"] else "replicated")
        lines.append(f"| {r['b']} | {r['mode']} | {tokens} | {r['layer_us']:.1f} | {fmt(r['comm_us'], '.1f')} | "
                     f"{fmt(r.get('speedup'), '.2f')} | {fmt(r.get('efficiency'), '.2f')} |")
    best = {}
    for r in result["rows"]:
        if r["mode"] != "one_gpu" and r.get("speedup") and r["speedup"] > best.get(r["b"], (0, ""))[0]:
            best[r["b"]] = (r["speedup"], r["mode"])
    lines += ["", "best mode per B: " + ", ".join(f"B={b}: {m} {s:.2f}x" for b, (s, m) in sorted(best.items()))]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--layers", type=int, default=4, help="layers per program (one TP1 layer: ~5.6 GB)")
    parser.add_argument("--batches", type=lambda s: [int(v) for v in s.split(",")], default=list(BATCHES))
    parser.add_argument("--modes", type=lambda s: s.split(","), default=list(MODES))
    parser.add_argument("--precision", choices=("default", "highest"), default="default")
    parser.add_argument("--repeats", type=int, default=3, help="median over this many slope measurements")
    parser.add_argument("--target-s", type=float, default=0.02, help="aim for programs of about this many seconds")
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args()
    if args.dry_run:
        args.layers = min(args.layers, 2)
        args.batches = [b for b in args.batches if b <= 16]
        args.repeats, args.target_s = 1, 0.0
    unknown = set(args.modes) - set(MODES)
    if unknown:
        parser.error(f"--modes: unknown {sorted(unknown)}; choose from {MODES}")
    if args.layers < 1 or any(b < 1 for b in args.batches):
        parser.error("--layers and --batches must be positive")
    result = run(args)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    print(table(result))


if __name__ == "__main__":
    main()
