"""The peers the benchmarks compare against, on the same shapes and routings:

- the seed's own W4A8 MoE kernels (SGLang sgl-kernel at PR #12921: a CUTLASS grouped GEMM with
  int4 weights and fp8 activations, and its data prep), loaded from the standalone library
  sgl_w4a8_seed.so through torch.ops (`SeedKernels`);
- torch's grouped GEMMs, torch._grouped_mm (bf16) and torch._scaled_grouped_mm (fp8 with
  row/column scales), and a torch MoE layer built on them;
- what a JAX user has otherwise: jax.lax.ragged_dot on bf16 weights, and a dense einsum layer.

Where the seed's library is: --seed-dir, else $W4AFP8_SEED_DIR, else .peers/sgl_w4a8 under the
repository root (an ignored folder; the device machine gets it through `carry`).
"""

from __future__ import annotations

import os
from pathlib import Path

import timing  # first: the JAX allocator flag, the import path and the torch guard

import jax
import jax.numpy as jnp
import numpy as np

from problems import GROUP_SIZE, silu_mul_f32

SEED_LIBRARY = "sgl_w4a8_seed.so"
SEED_NAME = "seed (sgl-kernel)"
DEFAULT_SEED_DIR = timing.REPO_ROOT / ".peers" / "sgl_w4a8"


def to_torch(x):
    """A JAX (or numpy) array as a torch CUDA tensor (through a host copy)."""
    return timing.torch.from_numpy(np.asarray(x).copy()).cuda()


# --------------------------------------------------------------------------- the seed's kernels

def add_seed_dir_arg(parser) -> None:
    parser.add_argument("--seed-dir", type=Path, default=None,
                        help=f"folder holding {SEED_LIBRARY} (default: $W4AFP8_SEED_DIR, else "
                             f"{DEFAULT_SEED_DIR.relative_to(timing.REPO_ROOT)} under the repository root)")


def seed_dir(args) -> Path:
    if getattr(args, "seed_dir", None) is not None:
        return args.seed_dir
    return Path(os.environ["W4AFP8_SEED_DIR"]) if os.environ.get("W4AFP8_SEED_DIR") else DEFAULT_SEED_DIR


class SeedKernels:
    """The seed's kernels for one MoE shape, called the way SGLang's W4A8 path calls them:

    - weights int8 [E, N, K/2], two int4 per byte; group scales bf16 [E, K/512, 4N] (four
      128-wide groups interleaved per row); strides int64 [E, 3]: K for the A and B operands,
      N for the output and the scales;
    - the data prep get_cutlass_w4a8_moe_mm_data(topk_ids) writes expert_offsets [E+1] and
      the per-expert problem sizes (N, rows, K) of both GEMMs;
    - cutlass_w4a8_moe_mm(out bf16 [R, N], x fp8 [R, K], weights, a_scale f32 [1], scales,
      expert_offsets[:E], problem_sizes, strides..., chunk 128, top_k) with the rows in expert
      order.

    Only the time is measured, so weights and scales are random bytes and values in the
    seed's layout (which order the bytes are in does not change a streaming kernel's work).
    Raises RuntimeError with the reason when the library cannot be used.
    """

    def __init__(self, directory: Path, shape):
        if not timing.torch_ok():
            raise RuntimeError(f"the seed's kernels run through torch: {timing.TORCH_UNAVAILABLE}")
        library = Path(directory) / SEED_LIBRARY
        if not library.is_file():
            raise RuntimeError(f"{library} not found (copy ../shared/peers/sgl_w4a8 there, or pass --seed-dir "
                               "or W4AFP8_SEED_DIR)")
        torch = timing.torch
        torch.ops.load_library(str(library))
        self.ops = torch.ops.sgl_w4a8_seed
        self.library = str(library)
        self.build_info = str(self.ops.build_info()) if hasattr(self.ops, "build_info") else "unknown"
        self.shape = shape
        self.sizes = {"gemm1": shape.gemm1(), "gemm2": shape.gemm2()}
        e = shape.experts
        self.strides = {}
        for gemm, (n, k) in self.sizes.items():
            ab = torch.full((e, 3), k, device="cuda", dtype=torch.int64)
            cs = torch.full((e, 3), n, device="cuda", dtype=torch.int64)
            self.strides[gemm] = (ab, ab, cs, cs)

    def weight_sets(self, gemm: str, count: int, generator) -> list[tuple]:
        """count independent (weights, scales) sets of one GEMM in the seed's layout."""
        torch = timing.torch
        n, k = self.sizes[gemm]
        e = self.shape.experts
        sets = []
        for _ in range(count):
            w = torch.randint(-128, 128, (e, n, k // 2), dtype=torch.int8, device="cuda", generator=generator)
            s = torch.rand((e, k // (4 * GROUP_SIZE), 4 * n), device="cuda", generator=generator)
            sets.append((w, (s * 0.005 + 0.0025).to(torch.bfloat16)))
        return sets

    def routing(self, topk_ids) -> dict:
        """The seed's data prep for torch int32 topk_ids [B, k]: a callable `prep` (what is
        timed) and the buffers it fills (expert_offsets, problem sizes of both GEMMs)."""
        torch = timing.torch
        e = self.shape.experts
        slots = topk_ids.numel()
        out = {"topk_ids": topk_ids,
               "expert_offsets": torch.empty((e + 1,), dtype=torch.int32, device="cuda"),
               "gemm1": torch.empty((e, 3), dtype=torch.int32, device="cuda"),
               "gemm2": torch.empty((e, 3), dtype=torch.int32, device="cuda"),
               "a_map": torch.empty((slots,), dtype=torch.int32, device="cuda"),
               "c_map": torch.empty((slots,), dtype=torch.int32, device="cuda")}

        def prep():
            self.ops.get_cutlass_w4a8_moe_mm_data(topk_ids, out["expert_offsets"], out["gemm1"], out["gemm2"],
                                                  out["a_map"], out["c_map"], e, self.shape.intermediate,
                                                  self.shape.hidden)
        out["prep"] = prep
        prep()
        return out

    def check_routing(self, routing: dict, group_offsets) -> bool:
        """Whether the seed's data prep agrees with our group offsets [E+1] and the shapes."""
        torch = timing.torch
        torch.cuda.synchronize()
        ok = np.array_equal(routing["expert_offsets"].cpu().numpy(), np.asarray(group_offsets))
        counts = routing["expert_offsets"].diff()
        for gemm, (n, k) in self.sizes.items():
            ps = routing[gemm]
            ok = ok and bool((ps[:, 0] == n).all()) and bool((ps[:, 2] == k).all()) and torch.equal(ps[:, 1], counts)
        return bool(ok)

    def gemm(self, gemm: str, out, x, weights: tuple, a_scale, routing: dict):
        """A callable running one seed GEMM into out (bf16 [R, N]) from x (fp8 [R, K])."""
        w, s = weights
        offsets = routing["expert_offsets"][:-1]
        sizes = routing[gemm]
        strides = self.strides[gemm]
        top_k = self.shape.top_k
        return lambda: self.ops.cutlass_w4a8_moe_mm(out, x, w, a_scale, s, offsets, sizes, *strides,
                                                    GROUP_SIZE, top_k)


# --------------------------------------------------------------------------- torch grouped GEMMs

TORCH_PRECISIONS = ("bf16", "fp8")


def torch_weights(precision: str, experts: int, n: int, k: int, generator) -> tuple:
    """(w [E, N, K] (K contiguous), per-column f32 scales [E, N] or None) for torch's grouped
    GEMM: bf16 ~ N(0, 0.02^2), or those values in fp8 e4m3 with scales in [0.5, 1.5)."""
    torch = timing.torch
    w = torch.randn(experts, n, k, device="cuda", dtype=torch.bfloat16, generator=generator).mul_(0.02)
    if precision == "bf16":
        return w, None
    return w.to(torch.float8_e4m3fn), torch.rand(experts, n, device="cuda", generator=generator) + 0.5


def torch_grouped_gemm(a, w, w_scale, row_ends):
    """A callable: rows [R, K] (bf16; quantized to fp8 with per-row scales when w_scale is
    given) times w [E, N, K] grouped by the cumulative row ends row_ends int32 [E]."""
    torch = timing.torch
    if w_scale is None:
        return lambda: torch._grouped_mm(a, w.transpose(-2, -1), offs=row_ends)
    a8 = a.to(torch.float8_e4m3fn)
    a_scale = torch.rand(a.shape[0], device="cuda") + 0.5
    return lambda: torch._scaled_grouped_mm(a8, w.transpose(-2, -1), a_scale, w_scale, offs=row_ends,
                                            out_dtype=torch.bfloat16)


def torch_signatures() -> dict:
    """The schemas of torch's grouped GEMM ops as this torch build has them."""
    out = {}
    if timing.torch_ok():
        for op in ("_grouped_mm", "_scaled_grouped_mm"):
            try:
                out[op] = str(getattr(timing.torch.ops.aten, op).default._schema)
            except Exception as err:  # noqa: BLE001
                out[op] = f"unknown ({err})"
    return out


def torch_layer(x, ids, topk_weights, w13, w2, s13=None, s2=None, routed_scaling_factor: float = 1.0):
    """The torch MoE layer: argsort routing, gather, grouped GEMM, silu * up, grouped GEMM,
    index_add combine. Weights [E, N, K] (K contiguous); s13/s2 per-column f32 scales select
    the fp8 GEMMs (dynamic per-row fp8 activations)."""
    torch = timing.torch
    experts, inter = w13.shape[0], w13.shape[1] // 2
    tokens, top_k = ids.shape
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    token = order // top_k
    counts = torch.zeros(experts, dtype=torch.int32, device=x.device).index_add_(
        0, flat, torch.ones_like(flat, dtype=torch.int32))
    row_ends = torch.cumsum(counts, 0, dtype=torch.int32)
    c1 = _torch_layer_gemm(x.index_select(0, token), w13, row_ends, s13)
    hidden = torch.nn.functional.silu(c1[:, :inter]) * c1[:, inter:]
    c2 = _torch_layer_gemm(hidden, w2, row_ends, s2)
    contrib = c2.float() * topk_weights.reshape(-1)[order].unsqueeze(1)
    out = torch.zeros(tokens, x.shape[1], dtype=torch.float32, device=x.device).index_add_(0, token, contrib)
    return (out * routed_scaling_factor).to(torch.bfloat16)


def _torch_layer_gemm(a, w, row_ends, w_scale):
    torch = timing.torch
    if w_scale is None:
        return torch._grouped_mm(a, w.transpose(-2, -1), offs=row_ends)
    a_scale = a.abs().amax(dim=1).float().clamp_min(1e-12) / 448.0  # dynamic per-row fp8
    a8 = (a.float() / a_scale.unsqueeze(1)).to(torch.float8_e4m3fn)
    return torch._scaled_grouped_mm(a8, w.transpose(-2, -1), a_scale, w_scale, offs=row_ends,
                                    out_dtype=torch.bfloat16)


# --------------------------------------------------------------------------- pure JAX

def dequantize_bf16_t(w) -> jax.Array:
    """bf16 [E, K, N] (the layout ragged_dot takes) from W4Weights [E, N, K], a few experts at a time."""
    step = max(1, w.num_experts // 16)
    f = jax.jit(lambda packed, scales: jnp.swapaxes(
        type(w)(packed, scales, w.group_size, w.layout).dequantize().astype(jnp.bfloat16), 1, 2))
    return jnp.concatenate([f(w.packed[s:s + step], w.scales[s:s + step])
                            for s in range(0, w.num_experts, step)], axis=0)


def jax_ragged_layer(x, ids, topk_weights, w13_t, w2_t, routed_scaling_factor: float = 1.0):
    """Pure JAX: expert-sorted rows, jax.lax.ragged_dot on bf16 weights for both GEMMs, f32 combine."""
    tokens, top_k = ids.shape
    experts = w13_t.shape[0]
    flat = ids.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    token = order // top_k
    sizes = jnp.zeros(experts, jnp.int32).at[flat].add(1)
    c1 = jax.lax.ragged_dot(x[token], w13_t, sizes)
    hidden = silu_mul_f32(c1).astype(jnp.bfloat16)
    c2 = jax.lax.ragged_dot(hidden, w2_t, sizes)
    contrib = c2.astype(jnp.float32) * topk_weights.reshape(-1)[order][:, None]
    out = jnp.zeros((tokens, x.shape[1]), jnp.float32).at[token].add(contrib)
    return (out * routed_scaling_factor).astype(jnp.bfloat16)


def jax_dense_layer(x, ids, topk_weights, w13_t, w2_t, routed_scaling_factor: float = 1.0):
    """Pure JAX, dense over all experts: every token through every expert, the routing weights
    (zero for experts not chosen) folded in before the second GEMM."""
    tokens = x.shape[0]
    dense_w = jnp.zeros((tokens, w13_t.shape[0]), jnp.float32).at[jnp.arange(tokens)[:, None], ids].add(topk_weights)
    c1 = jnp.einsum("bh,ehn->ben", x, w13_t)
    hidden = (silu_mul_f32(c1) * dense_w[..., None]).astype(jnp.bfloat16)
    out = jnp.einsum("bei,eih->bh", hidden, w2_t, preferred_element_type=jnp.float32)
    return (out * routed_scaling_factor).astype(jnp.bfloat16)
