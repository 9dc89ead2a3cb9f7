"""How the benchmarks time things: jitted JAX programs by a slope, torch and the seed's kernels
by CUDA events (triton's do_bench, or CUDA-graph replays), and kernels under Nsight Compute by
the durations it writes as CSV.

Import this module before jax (every benchmark module does, directly or through problems,
peers and reports): it stops JAX from taking 75% of the GPU up front (torch shares the GPU)
and puts the repository root on sys.path, so `python3 benchmarks/<name>.py` runs from a
source checkout.

Why a slope: XLA runs on its own CUDA stream, not torch's, so CUDA events recorded on torch's
stream bracket a JAX call only when the call blocks, and then include the Python dispatch and
the wait (~20-40 us), which would swamp a 10 us kernel. `time_jax` therefore puts n calls on
distinct inputs (so XLA cannot merge them, and rotating inputs keeps the L2 from serving
weights) into one jitted program, times programs of n and 2n calls, and takes
(T(2n) - T(n)) / n: the fixed cost of a program cancels. torch peers run on torch's stream
and are timed by do_bench directly (which flushes the L2 before every call) or, for kernels of
a few microseconds, by replaying a CUDA graph of one call per weight set (`time_cuda_graph`,
how SGLang's decode runs the seed's kernels).

torch and triton are optional: without them JAX programs are timed by wall-clock medians
around `jax.block_until_ready` and the torch peers are reported as n/a with the reason.
Scripts run under Nsight Compute set W4AFP8_BENCH_TORCH=0 before importing this module: ncu
crashed (rc 139, no kernel profiled) in a process that had imported torch beside jax.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import re
import sys
import time
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import jax  # noqa: E402
import numpy as np  # noqa: E402

torch = None
triton_testing = None
if os.environ.get("W4AFP8_BENCH_TORCH", "1") == "0":
    TORCH_UNAVAILABLE = "torch disabled (W4AFP8_BENCH_TORCH=0)"
else:
    try:
        import torch
        import triton.testing as triton_testing
        TORCH_UNAVAILABLE = None if torch.cuda.is_available() else "torch sees no CUDA device"
    except Exception as err:  # noqa: BLE001 - any import failure means "no torch peers"
        torch = triton_testing = None
        TORCH_UNAVAILABLE = (f"torch/triton unavailable ({type(err).__name__}: {err}); install torch with CUDA "
                             "and triton for the torch and seed peers and CUDA-event timing")


def torch_ok() -> bool:
    """Whether torch (with triton) can run on a CUDA device in this process."""
    return TORCH_UNAVAILABLE is None


def method() -> str:
    """One line saying how this process times, for the results' environment record."""
    if torch_ok():
        return ("JAX: slope of n- and 2n-call jitted programs, triton.testing.do_bench medians; torch: do_bench "
                "medians (L2 flushed per call) or CUDA-graph replays over rotating weight sets")
    return "JAX: slope of n- and 2n-call jitted programs, wall-clock medians (no torch)"


# --------------------------------------------------------------------------- single callables

def bench(fn, warmup_ms: float = 25.0, rep_ms: float = 100.0, sync_torch_first: bool = False) -> float:
    """Median seconds of fn(); fn must block until its device work is done or run on torch's
    stream. sync_torch_first: the callable runs JAX work, so torch's stream (where do_bench
    flushes the L2) must finish before it starts."""
    if torch_ok():
        def synced():
            torch.cuda.synchronize()
            return fn()
        return triton_testing.do_bench(synced if sync_torch_first else fn, warmup=warmup_ms, rep=rep_ms,
                                       return_mode="median") * 1e-3
    fn()
    t0 = time.perf_counter()
    fn()
    estimate = max(time.perf_counter() - t0, 1e-6)
    for _ in range(max(1, int(warmup_ms * 1e-3 / estimate))):
        fn()
    return wall_median(fn, min(1000, max(5, int(rep_ms * 1e-3 / estimate))))


def wall_median(fn, reps: int) -> float:
    """Median wall-clock seconds of reps calls of fn() (fn blocks until its work is done)."""
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def block(out):
    """Waits for out (JAX arrays) and for torch's stream."""
    if torch_ok():
        torch.cuda.synchronize()
    return jax.block_until_ready(out)


def free_torch() -> None:
    if torch_ok():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- JAX programs

def _program(fn, instances, calls: int, chain: bool):
    """A zero-argument callable running one jitted program of `calls` calls fn(*instances[j]).
    chain: each call waits for the previous one's outputs (an optimization barrier), so XLA
    can neither fuse nor overlap the calls; needed when fn is made of XLA fusions."""
    def program(insts):
        outs, prev = [], None
        for j in range(calls):
            args = insts[j]
            if chain and prev is not None:
                prev, args = jax.lax.optimization_barrier((prev, args))
            prev = fn(*args)
            outs.append(prev)
        return outs
    run = jax.jit(program, keep_unused=True)
    return lambda: jax.block_until_ready(run(instances))


def _warm(fn):
    fn()
    return fn


def time_jax(fn, instances, *, calls: int | None = None, estimate_s: float | None = None,
             target_s: float = 1e-3, chain: bool = False, warmup_ms: float = 25.0,
             rep_ms: float = 100.0) -> tuple[float, dict]:
    """Seconds per call of the jitted fn(*instance), as the slope between jitted programs of n
    and 2n calls on distinct instances (consecutive calls use different inputs). n is given,
    or picked so one program runs about target_s from estimate_s (a lower bound such as the
    floor) or from a timed one-call program; n is at most len(instances) // 2.

    Returns (seconds per call, details: calls, the two program times, the method).
    """
    max_calls = max(1, len(instances) // 2)
    if calls is None and estimate_s is not None:
        calls = math.ceil(target_s / max(estimate_s, 1e-6))
    if calls is None and max_calls == 1:
        calls = 1
    if calls is None:
        t1 = bench(_warm(_program(fn, instances, 1, chain)), warmup_ms / 4, rep_ms / 4, sync_torch_first=True)
        calls = math.ceil(target_s / t1)
    calls = max(1, min(calls, max_calls))
    t_n = bench(_warm(_program(fn, instances, calls, chain)), warmup_ms, rep_ms, sync_torch_first=True)
    t_2n = bench(_warm(_program(fn, instances, 2 * calls, chain)), warmup_ms, rep_ms, sync_torch_first=True)
    return slope(t_n, t_2n, calls, {"calls": calls})


def slope(t_n: float, t_m: float, n: int, details: dict | None = None, m: int | None = None) -> tuple[float, dict]:
    """Seconds per unit from the times of programs of n and m > n units of work (m = 2n by
    default). When noise swamps the difference (slope <= a quarter of the m program's mean per
    unit) that mean, an upper bound, is returned instead, and said so in details["method"]."""
    m = 2 * n if m is None else m
    per_unit, note = (t_m - t_n) / (m - n), "slope"
    if per_unit <= 0.25 * t_m / m:
        per_unit, note = t_m / m, "upper bound (T(m)/m), slope was noisy"
    return per_unit, {**(details or {}), "n": n, "m": m, "t_n_us": t_n * 1e6, "t_m_us": t_m * 1e6, "method": note}


# --------------------------------------------------------------------------- torch and the seed

def time_cuda_graph(fns, iters: int = 30, warmup: int = 3) -> float:
    """Seconds per call of the torch callables fns (one call each, e.g. one per weight set so the
    L2 cannot serve weights), captured once into a CUDA graph and replayed iters times between
    CUDA events: device time per call without host launch overhead. Median over replays."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up off the capture (lazy initialisation, workspaces)
        for _ in range(warmup):
            for f in fns:
                f()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for f in fns:
            f()
    graph.replay()
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    for start, end in events:
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    del graph
    return float(np.median([s.elapsed_time(e) for s, e in events])) * 1e-3 / len(fns)


def torch_graphed(fn):
    """fn captured into a CUDA graph (its replay callable), or None when capture fails."""
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
            block(once())  # compile and warm up
            t0 = time.perf_counter()
            block(once())
            single = time.perf_counter() - t0
            if single > self.limit_s:
                self.stopped = f"skipped after B={size}: one call took {single * 1e3:.0f} ms"
                return {"us": single * 1e6, "note": "one call, over the limit"}
            seconds = timer()
        except Exception as err:  # noqa: BLE001 - report any failure of a peer, keep going
            self.stopped = f"skipped: failed at B={size}"
            free_torch()
            return {"us": None, "note": "n/a: " + error_text(err)}
        self.last = (size, seconds)
        return {"us": seconds * 1e6}


def error_text(err: BaseException, limit: int = 300) -> str:
    return f"{type(err).__name__}: {err}".replace("\n", " ")[:limit]


# --------------------------------------------------------------------------- Nsight Compute

_NCU_MICROSECONDS_PER_UNIT = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3,
                              "s": 1e6, "second": 1e6}


def ncu_kernel_times(csv_path: str) -> list[tuple[str, float]]:
    """(kernel name, microseconds) of every profiled kernel in `ncu --csv --metrics
    gpu__time_duration.sum` output, in launch order (ncu's ID)."""
    with open(csv_path) as f:  # ncu and the program print other lines too: the CSV ones are quoted
        rows = [r for r in csv.DictReader(line for line in f if line.startswith('"'))
                if r["Metric Name"] == "gpu__time_duration.sum"]
    rows.sort(key=lambda r: int(r["ID"]))
    return [(r["Kernel Name"], float(r["Metric Value"].replace(",", "")) * _NCU_MICROSECONDS_PER_UNIT[r["Metric Unit"]])
            for r in rows]


def short_name(kernel: str, width: int = 60) -> str:
    """ncu's demangled kernel name without return type, namespaces and parameter list."""
    name = kernel.removeprefix("void ").replace("(anonymous namespace)::", "").replace("<unnamed>::", "")
    if name.endswith(")"):  # cut the parameter list: the parenthesized group that ends the name
        depth = 0
        for i in range(len(name) - 1, -1, -1):
            depth += {")": 1, "(": -1}.get(name[i], 0)
            if depth == 0:
                name = name[:i]
                break
    name = re.sub(r"\w+::", "", name)
    return name if len(name) <= width else name[:width - 3] + "..."


def print_kernels(kernels: list[tuple[str, float]]) -> None:
    for name, t in kernels:
        print(f"    {short_name(name):60s} {t:9.1f} us")


def ncu_parser(doc: str):
    """(parser, `launch` subparser, `report` subparser with --csv) of the two-step ncu scripts."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="step", required=True)
    launch, report = sub.add_parser("launch"), sub.add_parser("report")
    report.add_argument("--csv", required=True, help="ncu --csv output")
    return parser, launch, report


def run_ncu_step(parser, launch, report) -> None:
    args = parser.parse_args()
    launch(args) if args.step == "launch" else report(args)
