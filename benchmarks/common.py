"""Shared helpers of the benchmarks: environment checks, timing, hardware rates (the floors),
random weights and routing on the device, peers' guards, tables, JSON and PNG output.

Timing rules (SPEC.md section 5): every timed JAX function is jitted and warmed up, the data
is random, and small problems rotate over several independent weight sets and routings so
the 50 MB L2 cannot serve the weights.

How a JAX function is timed: XLA runs on its own CUDA stream, not torch's, so CUDA events
recorded by `triton.testing.do_bench` on torch's stream only bracket a call when the call
blocks; what they then see includes the Python dispatch and the wait (~20-40 us), which
would swamp a 10 us kernel. So `time_jax` puts n independent calls (different inputs, so
XLA cannot merge them) into one jitted program, times programs of n and 2n calls, and takes
the slope (T(2n) - T(n)) / n: the fixed dispatch and synchronisation cost cancels. torch
peers run on torch's stream and are timed by do_bench directly (which also flushes the L2
before every call).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
from pathlib import Path

# Before jax is imported anywhere: torch shares the GPU, so JAX must not grab 75% up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run from a source checkout: python3 benchmarks/bench_x.py
    sys.path.insert(0, str(REPO_ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import w4afp8_jax  # noqa: E402
from w4afp8_jax import W4Weights  # noqa: E402

# DeepSeek-V3 at tensor-parallel 4 (SPEC.md section 1).
NUM_EXPERTS = 256
HIDDEN = 7168
INTER = 512
TOP_K = 8
ROUTED_SCALING_FACTOR = 2.5
GROUP_SIZE = 128
BATCHES = (1, 4, 16, 32, 64, 128, 512, 2048, 8192)
QUICK_BATCHES = (1, 64)
L2_BYTES = 50 * 2**20
FP8 = jnp.float8_e4m3fn

# torch and triton are optional: peers and CUDA-event timing need them. Kernel-only scripts run
# under Nsight Compute set W4AFP8_BENCH_TORCH=0: ncu crashed (rc 139, no kernel profiled) in a
# process that had imported torch beside jax.
torch = None
if os.environ.get("W4AFP8_BENCH_TORCH", "1") == "0":
    _TORCH_ERROR = "torch disabled (W4AFP8_BENCH_TORCH=0)"
else:
    try:
        import torch
        import triton.testing
        _TORCH_ERROR = None if torch.cuda.is_available() else "torch sees no CUDA device"
    except Exception as err:  # noqa: BLE001 - any import failure means "no torch peers"
        torch = None
        _TORCH_ERROR = f"torch/triton unavailable ({type(err).__name__}: {err})"


# --------------------------------------------------------------------------- command line

def base_parser(description: str, default_limit_ms: float) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--json", type=Path, default=None, help="write all numbers here")
    p.add_argument("--png", type=Path, default=None, help="plot (default: the --json path with .png)")
    p.add_argument("--quick", action="store_true", help=f"smoke run: B in {QUICK_BATCHES} only")
    p.add_argument("--batches", type=lambda s: tuple(int(b) for b in s.split(",")), default=None,
                   help="comma-separated token counts (default: %s)" % ",".join(map(str, BATCHES)))
    p.add_argument("--no-peers", action="store_true", help="time only this project's kernels")
    p.add_argument("--peer-limit-ms", type=float, default=default_limit_ms,
                   help="a peer whose single call takes longer (or is predicted to, from the previous B) "
                        "is not timed further")
    p.add_argument("--warmup-ms", type=float, default=25.0)
    p.add_argument("--rep-ms", type=float, default=100.0)
    p.add_argument("--seed", type=int, default=None, help="default: fresh entropy (printed)")
    p.add_argument("--dry-run", action="store_true",
                   help="tiny shapes on the reference path, for testing the harness without a GPU "
                        "(the numbers mean nothing)")
    return p


def start(parser: argparse.ArgumentParser, script: str):
    """Parses the command line, checks the GPU, prints the environment and measures the rates.
    Returns (args, implementation, environment dict, rates dict, root PRNG key)."""
    args = parser.parse_args()
    if args.batches is None:
        args.batches = (1, 4) if args.dry_run else QUICK_BATCHES if args.quick else BATCHES
    if args.quick:
        args.rep_ms = min(args.rep_ms, 40.0)
        args.warmup_ms = min(args.warmup_ms, 10.0)
    if args.png is None and args.json is not None:
        args.png = args.json.with_suffix(".png")
    if args.seed is None:
        args.seed = int(np.random.SeedSequence().entropy % (2**31))
    implementation = require_gpu(script, args.dry_run)
    env = environment(args, implementation)
    rates = measure_rates(args, args.dry_run)
    return args, implementation, env, rates, jax.random.key(args.seed)


def require_gpu(script: str, dry_run: bool) -> str:
    """The implementation to benchmark; exits with a clear message when the CUDA path is missing."""
    if dry_run:
        return "reference"
    reason = w4afp8_jax.cuda_unavailable_reason()
    if reason is not None:
        sys.exit(f"{script} needs a GPU with the CUDA build of w4afp8_jax: {reason}. "
                 "(--dry-run exercises the harness on the reference path without one.)")
    return "cuda"


def environment(args, implementation: str) -> dict:
    info = {
        "jax": jax.__version__, "jax_devices": [str(d) for d in jax.devices()],
        "device_kind": jax.devices()[0].device_kind, "implementation": implementation,
        "torch": None if torch is None else torch.__version__, "torch_note": _TORCH_ERROR,
        "seed": args.seed, "argv": sys.argv[1:], "timing": timing_method(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    print(f"device: {info['device_kind']} | jax {info['jax']} | torch {info['torch'] or 'n/a'}"
          f"{'' if _TORCH_ERROR is None else ' (' + _TORCH_ERROR + ')'} | seed {args.seed}")
    print(f"timing: {info['timing']}")
    return info


def timing_method() -> str:
    if torch_ok():
        return ("triton.testing.do_bench medians (CUDA events, L2 flushed per call); JAX: slope of "
                "n- and 2n-call jitted programs")
    return "wall-clock medians around jax.block_until_ready; JAX: slope of n- and 2n-call programs"


def torch_ok() -> bool:
    return torch is not None and _TORCH_ERROR is None


# --------------------------------------------------------------------------- timing

def bench(fn, warmup_ms: float = 25.0, rep_ms: float = 100.0, sync_torch_first: bool = False) -> float:
    """Median seconds of fn() (fn must finish its device work or be on torch's stream)."""
    if torch_ok():
        def synced():  # do_bench's L2 flush runs on torch's stream: let it finish first
            torch.cuda.synchronize()
            return fn()
        return triton.testing.do_bench(synced if sync_torch_first else fn, warmup=warmup_ms, rep=rep_ms,
                                       return_mode="median") * 1e-3
    fn()
    t0 = time.perf_counter()
    fn()
    estimate = max(time.perf_counter() - t0, 1e-6)
    for _ in range(max(1, int(warmup_ms * 1e-3 / estimate))):
        fn()
    times = []
    for _ in range(min(1000, max(5, int(rep_ms * 1e-3 / estimate)))):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _program(fn, instances, calls: int):
    """A zero-argument callable running one jitted program of `calls` calls fn(*instances[j])."""
    run = jax.jit(lambda insts: [fn(*insts[j]) for j in range(calls)], keep_unused=True)
    return lambda: jax.block_until_ready(run(instances))


def time_jax(fn, instances, *, calls: int | None = None, estimate_s: float | None = None,
             target_s: float = 1e-3, warmup_ms: float = 25.0, rep_ms: float = 100.0) -> tuple[float, dict]:
    """Seconds per call of the jitted fn(*instance), as the slope between jitted programs of n
    and 2n calls on distinct instances (so XLA cannot merge calls; consecutive calls use
    different inputs). n is given, or picked so one program runs about target_s from
    estimate_s (a lower bound such as the floor) or from a timed one-call program.

    Returns (seconds per call, details).
    """
    max_calls = max(1, len(instances) // 2)
    if calls is None and estimate_s is not None:
        calls = math.ceil(target_s / max(estimate_s, 1e-6))
    if calls is None and max_calls == 1:
        calls = 1
    if calls is None:
        single = _program(fn, instances, 1)
        single()  # compile and warm up
        t1 = bench(single, warmup_ms / 4, rep_ms / 4, sync_torch_first=True)
        calls = int(min(max_calls, max(1, math.ceil(target_s / t1))))
    calls = max(1, min(calls, max_calls))
    t_n = bench(_warm(_program(fn, instances, calls)), warmup_ms, rep_ms, sync_torch_first=True)
    t_2n = bench(_warm(_program(fn, instances, 2 * calls)), warmup_ms, rep_ms, sync_torch_first=True)
    per_call = (t_2n - t_n) / calls
    note = "slope"
    if per_call <= 0.25 * t_2n / (2 * calls):  # noise swamped the slope: report the upper bound
        per_call, note = t_2n / (2 * calls), "upper bound (T(2n)/2n), slope was noisy"
    return per_call, {"calls": calls, "t_n_us": t_n * 1e6, "t_2n_us": t_2n * 1e6, "method": note}


def _warm(fn):
    fn()
    return fn


class PeerGuard:
    """Runs a peer's timing under try/except and a time limit: after an error (say out of
    memory) or a call over the limit, larger problems of that peer are skipped."""

    def __init__(self, name: str, limit_ms: float):
        self.name, self.limit_s = name, limit_ms * 1e-3
        self.stopped: str | None = None
        self.last: tuple[int, float] | None = None  # (size, seconds) of the last success

    def run(self, size: int, setup) -> dict:
        """setup() -> (once, timer): once() makes one call, timer() returns seconds per call.
        Returns {"us": ...} or {"us": None, "note": ...}."""
        if self.stopped:
            return {"us": None, "note": self.stopped}
        if self.last and self.last[1] * size / self.last[0] > self.limit_s:
            predicted = self.last[1] * size / self.last[0]
            self.stopped = f"skipped: predicted {predicted * 1e3:.0f} ms > limit {self.limit_s * 1e3:.0f} ms"
            return {"us": None, "note": self.stopped}
        try:
            once, timer = setup()
            _block(once())  # compile and warm up
            t0 = time.perf_counter()
            _block(once())
            single = time.perf_counter() - t0
            if single > self.limit_s:
                self.stopped = f"skipped after B={size}: one call took {single * 1e3:.0f} ms"
                return {"us": single * 1e6, "note": "one call, over the limit"}
            seconds = timer()
        except Exception as err:  # noqa: BLE001 - report any failure of a peer, keep going
            text = f"{type(err).__name__}: {err}".replace("\n", " ")[:300]
            self.stopped = f"skipped: failed at B={size}"
            free_torch()
            return {"us": None, "note": "n/a: " + text}
        self.last = (size, seconds)
        return {"us": seconds * 1e6}


def _block(out):
    if torch_ok():
        torch.cuda.synchronize()
    return jax.block_until_ready(out)


def free_torch():
    if torch_ok():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- hardware rates

def measure_rates(args, dry_run: bool) -> dict:
    """Device-to-device copy bandwidth (bytes read + written per second) and the fp8
    tensor-core rate, measured now, on this device."""
    rates = {}
    nbytes = 2**24 if dry_run else 2**31
    if torch_ok():
        src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_()
        dst = torch.empty_like(src)
        t = bench(lambda: dst.copy_(src), args.warmup_ms, args.rep_ms)
        rates["copy_bytes_per_s"], rates["copy_source"] = 2 * nbytes / t, f"torch copy_ of {nbytes >> 20} MiB"
        del src, dst
        rates.update(_torch_fp8_rate(args))
        if rates["fp8_flops_per_s"] is None:
            torch_error = rates["fp8_source"]
            rates.update(_jax_fp8_rate(args, 8192))
            rates["fp8_source"] += f"; torch._scaled_mm failed: {torch_error}"
    else:
        x = jax.random.bits(jax.random.key(args.seed), (nbytes,), jnp.uint8)
        copy = jax.jit(lambda v: v ^ jnp.uint8(1))
        t = bench(_warm(lambda: jax.block_until_ready(copy(x))), args.warmup_ms, args.rep_ms)
        rates["copy_bytes_per_s"], rates["copy_source"] = 2 * nbytes / t, f"jax xor of {nbytes >> 20} MiB"
        del x
        rates.update(_jax_fp8_rate(args, 256 if dry_run else 8192))
    free_torch()
    print(f"measured: copy {rates['copy_bytes_per_s'] / 1e12:.2f} TB/s ({rates['copy_source']}); "
          + (f"fp8 {rates['fp8_flops_per_s'] / 1e12:.0f} TFLOP/s ({rates['fp8_source']})"
             if rates.get("fp8_flops_per_s") else f"fp8 rate n/a ({rates.get('fp8_source')})"))
    return rates


def _torch_fp8_rate(args) -> dict:
    n = 8192
    a = torch.randn(n, n, device="cuda").to(torch.float8_e4m3fn)
    b = torch.randn(n, n, device="cuda").to(torch.float8_e4m3fn)  # used as b.t(): column-major
    one = torch.ones((), device="cuda", dtype=torch.float32)
    best, source, errors = None, None, []
    for fast in (True, False):
        try:
            fn = lambda fast=fast: torch._scaled_mm(a, b.t(), scale_a=one, scale_b=one,  # noqa: E731
                                                   out_dtype=torch.bfloat16, use_fast_accum=fast)
            rate = 2 * n**3 / bench(fn, args.warmup_ms, args.rep_ms)
            if best is None or rate > best:
                best, source = rate, f"torch._scaled_mm {n}^3 e4m3, use_fast_accum={fast}"
        except Exception as err:  # noqa: BLE001
            errors.append(f"{type(err).__name__}: {err}"[:200])
    return {"fp8_flops_per_s": best, "fp8_source": source or "; ".join(errors)}


def _jax_fp8_rate(args, n: int) -> dict:
    try:
        a = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16).astype(FP8)
        b = jax.random.normal(jax.random.key(2), (n, n), jnp.bfloat16).astype(FP8)
        mm = jax.jit(lambda p, q: jax.lax.dot_general(p, q, (((1,), (1,)), ((), ())),
                                                      preferred_element_type=jnp.bfloat16))
        t = bench(_warm(lambda: jax.block_until_ready(mm(a, b))), args.warmup_ms, args.rep_ms)
        return {"fp8_flops_per_s": 2 * n**3 / t, "fp8_source": f"jax fp8 dot {n}^3 (no torch: may be below peak)"}
    except Exception as err:  # noqa: BLE001
        return {"fp8_flops_per_s": None, "fp8_source": f"jax fp8 dot failed: {err}"[:200]}


# --------------------------------------------------------------------------- random problems

def random_w4_weights(key, num_experts: int, out_features: int, in_features: int,
                      group_size: int = GROUP_SIZE) -> W4Weights:
    """Random packed int4 bytes (uniform over [-8, 7]) and scales ~ randn * 0.005, on the device,
    in the tiled layout the CUDA kernels read (W4Weights.prepare)."""
    k_packed, k_scales = jax.random.split(key)
    packed = jax.random.bits(k_packed, (num_experts, out_features, in_features // 2), jnp.uint8)
    scales = jax.random.normal(k_scales, (num_experts, out_features, in_features // group_size), jnp.float32)
    return W4Weights(packed, scales * 0.005, group_size).prepare()


def weight_bytes_per_expert(w: W4Weights) -> int:
    return (w.packed.nbytes + w.scales.nbytes) // w.num_experts


def uniform_topk_ids(key, tokens: int, num_experts: int = NUM_EXPERTS, top_k: int = TOP_K) -> jax.Array:
    """int32 [tokens, top_k]: each token picks top_k distinct experts uniformly at random."""
    return jax.lax.top_k(jax.random.uniform(key, (tokens, num_experts)), top_k)[1].astype(jnp.int32)


def random_topk_weights(key, tokens: int, top_k: int = TOP_K) -> jax.Array:
    return jax.nn.softmax(jax.random.normal(key, (tokens, top_k), jnp.float32), axis=-1)


def experts_hit(ids: np.ndarray, num_experts: int) -> int:
    return int(np.count_nonzero(np.bincount(np.asarray(ids).ravel(), minlength=num_experts)))


def group_offsets_of(ids: jax.Array, num_experts: int) -> jax.Array:
    """int32 [E+1] exclusive offsets of the expert-sorted rows (the reference `route`)."""
    return w4afp8_jax.route(ids, num_experts, implementation="reference").group_offsets


def instance_count(tokens: int) -> int:
    """Distinct input sets per problem size: many for small problems (rotation defeats the L2
    and gives the n- and 2n-call programs distinct calls), few for large ones (memory)."""
    return 32 if tokens <= 128 else 4


def weight_set_count(bytes_per_call: float, max_sets: int) -> int:
    """Weight sets to rotate so the weights touched between two uses of one set exceed 4x the L2."""
    return int(min(max_sets, max(1, math.ceil(4 * L2_BYTES / max(bytes_per_call, 1.0)))))


def to_torch(x):
    """A host copy of a JAX (or numpy) array as a torch CUDA tensor."""
    return torch.from_numpy(np.asarray(x).copy()).cuda()


def torch_graphed(fn):
    """fn captured into a CUDA graph (replay callable), or None when capture fails."""
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        torch.cuda.synchronize()
        return graph.replay
    except Exception:  # noqa: BLE001 - eager timing is the fallback
        torch.cuda.synchronize()
        return None


# --------------------------------------------------------------------------- output

def fmt(value, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) < 1e5 else f"{value:.3g}"
    return str(value)


def print_table(title: str, headers: list[str], rows: list[list], notes: list[str] = ()) -> None:
    cells = [[fmt(v, 2 if isinstance(v, float) and abs(v) < 10 else 1) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    print(f"\n{title}")
    print("  ".join(h.rjust(w) for h, w in zip(headers, widths)))
    print("  ".join("-" * w for w in widths))
    for r in cells:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))
    for note in notes:
        print(f"  note: {note}")


def peer_notes(rows: list[dict], key: str = "peers") -> list[str]:
    """One line per (peer, note) with the B values it applies to."""
    grouped: dict[tuple[str, str], list[int]] = {}
    for r in rows:
        for peer, v in r.get(key, {}).items():
            if v.get("note"):
                grouped.setdefault((peer, v["note"]), []).append(r["B"])
    return [f"{peer} at B={','.join(map(str, bs))}: {note}" for (peer, note), bs in grouped.items()]


def _clean(obj):
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(path: Path | None, data: dict) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_clean(data), indent=1))
    print(f"wrote {path}")


def write_png(path: Path | None, panels: list[dict], suptitle: str) -> None:
    """panels: [{"title", "x", "lines": {label: ys}, "dashed": {label: ys}, "ylabel"}], log-log."""
    if path is None:
        return
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except Exception as err:  # noqa: BLE001
        print(f"no plot: matplotlib unavailable ({err})")
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 5), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for style, lines in (("-o", panel.get("lines", {})), ("--", panel.get("dashed", {}))):
            for label, ys in lines.items():
                pts = [(x, y) for x, y in zip(panel["x"], ys) if y is not None and y > 0]
                if pts:
                    ax.plot(*zip(*pts), style, label=label, markersize=4)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(panel["x"], [str(x) for x in panel["x"]])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xlabel("tokens B")
        ax.set_ylabel(panel.get("ylabel", "time (us)"))
        ax.set_title(panel["title"], fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


# --------------------------------------------------------------------------- Nsight Compute

_NCU_MICROSECONDS_PER_UNIT = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3,
                              "s": 1e6, "second": 1e6}


def ncu_kernel_times(csv_path: str) -> list[tuple[str, float]]:
    """(kernel name, microseconds) of every profiled kernel, in launch order (ncu's ID)."""
    with open(csv_path) as f:  # ncu and the program print other lines too: the CSV ones are quoted
        rows = [r for r in csv.DictReader(line for line in f if line.startswith('"'))
                if r["Metric Name"] == "gpu__time_duration.sum"]
    rows.sort(key=lambda r: int(r["ID"]))
    return [(r["Kernel Name"], float(r["Metric Value"].replace(",", "")) * _NCU_MICROSECONDS_PER_UNIT[r["Metric Unit"]])
            for r in rows]
