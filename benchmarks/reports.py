"""What the benchmarks share around the measurements: the command line, the environment record,
the hardware rates measured in the same run (device copy bandwidth and the dense fp8 rate,
the denominators of every floor), tables, JSON and PNG plots.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import timing  # first: the JAX allocator flag, the import path and the torch guard

import jax
import jax.numpy as jnp
import numpy as np

import w4afp8_jax

torch = timing.torch


# --------------------------------------------------------------------------- command line

def batch_list(text: str) -> tuple[int, ...]:
    """Comma-separated token counts, each >= 1."""
    try:
        values = tuple(int(b) for b in text.split(",") if b.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"token counts must be >= 1, got {text!r}")
    return values


def base_parser(description: str, batches: tuple[int, ...], quick_batches: tuple[int, ...]) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, default=None, help="write all numbers here")
    p.add_argument("--png", type=Path, default=None, help="plot (default: the --json path with .png)")
    p.add_argument("--batches", type=batch_list, default=None,
                   help="comma-separated token counts B (default: %s)" % ",".join(map(str, batches)))
    p.add_argument("--quick", action="store_true", help=f"smoke run: B in {quick_batches} only (1, 4 with --dry-run), shorter timing")
    p.add_argument("--no-peers", action="store_true", help="time only this project's kernels")
    p.add_argument("--prng-seed", type=int, default=None, help="PRNG seed of the random data (default: fresh entropy, printed)")
    p.add_argument("--dry-run", action="store_true",
                   help="tiny shapes on the reference path, to test the harness without a GPU (numbers mean nothing)")
    p.set_defaults(default_batches=batches, quick_batches=quick_batches)
    return p


def add_jax_timing_args(p: argparse.ArgumentParser, peer_limit_ms: float) -> None:
    """Flags of the scripts that time with `timing.time_jax` and do_bench."""
    p.add_argument("--warmup-ms", type=float, default=25.0)
    p.add_argument("--rep-ms", type=float, default=100.0)
    p.add_argument("--peer-limit-ms", type=float, default=peer_limit_ms,
                   help="a peer whose single call takes longer (or is predicted to, from the previous B) is not "
                        "timed further")


def start(parser: argparse.ArgumentParser, script: str, fp8_rate: bool = True):
    """Parses the command line, checks the GPU, prints the environment and measures the rates.
    Returns (args, implementation, environment dict, rates dict, root PRNG key)."""
    args = parser.parse_args()
    if args.batches is None:
        args.batches = (1, 4) if args.dry_run else args.quick_batches if args.quick else args.default_batches
    if args.quick and hasattr(args, "rep_ms"):
        args.rep_ms, args.warmup_ms = min(args.rep_ms, 40.0), min(args.warmup_ms, 10.0)
    if args.png is None and args.json is not None:
        args.png = args.json.with_suffix(".png")
    if args.prng_seed is None:
        args.prng_seed = int(np.random.SeedSequence().entropy % (2**31))
    implementation = require_gpu(script, args.dry_run)
    env = environment(args, implementation)
    rates = measure_rates(args.prng_seed, args.dry_run, fp8_rate)
    return args, implementation, env, rates, jax.random.key(args.prng_seed)


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
        "torch": None if torch is None else torch.__version__, "torch_note": timing.TORCH_UNAVAILABLE,
        "gemm_configs": [c._asdict() for c in w4afp8_jax.grouped_gemm_configs()],
        "seed": args.prng_seed, "argv": sys.argv[1:], "timing": timing.method(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    print(f"device: {info['device_kind']} | jax {info['jax']} | torch {info['torch'] or 'n/a'}"
          f"{'' if timing.torch_ok() else ' (' + timing.TORCH_UNAVAILABLE + ')'} | PRNG seed {args.prng_seed}")
    print(f"timing: {info['timing']}")
    return info


# --------------------------------------------------------------------------- hardware rates

def measure_rates(seed: int, dry_run: bool, fp8_rate: bool = True) -> dict:
    """Device-to-device copy bandwidth (bytes read + written per second) and, if asked, the
    dense fp8 tensor-core rate (torch._scaled_mm 8192^3 e4m3, best of fast and exact
    accumulation; JAX's fp8 dot when torch is missing), measured now on this device."""
    rates = {}
    nbytes = 2**24 if dry_run else 2**31
    if timing.torch_ok():
        src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_()
        dst = torch.empty_like(src)
        t = timing.bench(lambda: dst.copy_(src))
        rates["copy_bytes_per_s"], rates["copy_source"] = 2 * nbytes / t, f"torch copy_ of {nbytes >> 20} MiB"
        del src, dst
        if fp8_rate:
            rates.update(_torch_fp8_rate())
            if rates["fp8_flops_per_s"] is None:
                torch_error = rates["fp8_source"]
                rates.update(_jax_fp8_rate(8192))
                rates["fp8_source"] += f"; torch._scaled_mm failed: {torch_error}"
    else:
        x = jax.random.bits(jax.random.key(seed), (nbytes,), jnp.uint8)
        flip = jax.jit(lambda v: v ^ jnp.uint8(1))
        jax.block_until_ready(flip(x))
        t = timing.bench(lambda: jax.block_until_ready(flip(x)))
        rates["copy_bytes_per_s"], rates["copy_source"] = 2 * nbytes / t, f"jax xor of {nbytes >> 20} MiB"
        del x
        if fp8_rate:
            rates.update(_jax_fp8_rate(256 if dry_run else 8192))
    timing.free_torch()
    line = f"measured: copy {rates['copy_bytes_per_s'] / 1e12:.2f} TB/s ({rates['copy_source']})"
    if fp8_rate:
        line += (f"; fp8 {rates['fp8_flops_per_s'] / 1e12:.0f} TFLOP/s ({rates['fp8_source']})"
                 if rates.get("fp8_flops_per_s") else f"; fp8 rate n/a ({rates.get('fp8_source')})")
    print(line, flush=True)
    return rates


def _torch_fp8_rate() -> dict:
    n = 8192
    a = torch.randn(n, n, device="cuda").to(torch.float8_e4m3fn)
    b = torch.randn(n, n, device="cuda").to(torch.float8_e4m3fn)  # used as b.t(): column-major
    one = torch.ones((), device="cuda", dtype=torch.float32)
    best, source, errors = None, None, []
    for fast in (True, False):
        try:
            def mm(fast=fast):
                return torch._scaled_mm(a, b.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16,
                                        use_fast_accum=fast)
            rate = 2 * n**3 / timing.bench(mm)
            if best is None or rate > best:
                best, source = rate, f"torch._scaled_mm {n}^3 e4m3, use_fast_accum={fast}"
        except Exception as err:  # noqa: BLE001
            errors.append(timing.error_text(err, 200))
    return {"fp8_flops_per_s": best, "fp8_source": source or "; ".join(errors)}


def _jax_fp8_rate(n: int) -> dict:
    try:
        fp8 = jnp.float8_e4m3fn
        a = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16).astype(fp8)
        b = jax.random.normal(jax.random.key(2), (n, n), jnp.bfloat16).astype(fp8)
        mm = jax.jit(lambda p, q: jax.lax.dot_general(p, q, (((1,), (1,)), ((), ())),
                                                      preferred_element_type=jnp.bfloat16))
        jax.block_until_ready(mm(a, b))
        t = timing.bench(lambda: jax.block_until_ready(mm(a, b)))
        return {"fp8_flops_per_s": 2 * n**3 / t, "fp8_source": f"jax fp8 dot {n}^3 (no torch: may be below peak)"}
    except Exception as err:  # noqa: BLE001
        return {"fp8_flops_per_s": None, "fp8_source": "jax fp8 dot failed: " + timing.error_text(err, 200)}


# --------------------------------------------------------------------------- tables

def fmt(value, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) < 1e5 else f"{value:.3g}"
    return str(value)


def format_table(title: str, headers: list[str], rows: list[list], notes: list[str] = ()) -> str:
    """A right-aligned text table; floats below 10 get two decimals, others one; None is n/a."""
    cells = [[fmt(v, 2 if isinstance(v, float) and abs(v) < 10 else 1) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    lines = [f"\n{title}", "  ".join(h.rjust(w) for h, w in zip(headers, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    lines += [f"  note: {note}" for note in notes]
    return "\n".join(lines)


def print_table(title: str, headers: list[str], rows: list[list], notes: list[str] = ()) -> None:
    print(format_table(title, headers, rows, notes), flush=True)


def peer_notes(rows: list[dict], key: str = "peers") -> list[str]:
    """One line per (peer, note) with the B values it applies to."""
    grouped: dict[tuple[str, str], list[int]] = {}
    for r in rows:
        for peer, v in r.get(key, {}).items():
            if isinstance(v, dict) and v.get("note"):  # entries such as "seed prep matches" are flags
                grouped.setdefault((peer, v["note"]), []).append(r["B"])
    return [f"{peer} at B={','.join(map(str, bs))}: {note}" for (peer, note), bs in grouped.items()]


# --------------------------------------------------------------------------- files

def clean(obj):
    """obj with numpy scalars as Python numbers, non-finite floats as None, paths as strings."""
    if isinstance(obj, dict):
        return {str(k): clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, np.integer):
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
    path.write_text(json.dumps(clean(data), indent=1))
    print(f"wrote {path}")


def write_png(path: Path | None, panels: list[dict], suptitle: str) -> None:
    """panels: [{"title", "x", "lines": {label: ys}, "dashed": {label: ys}, "ylabel"}], log-log;
    points that are None or <= 0 are left out."""
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
