"""The benchmarks' problems: shapes, random weights and routings on the device, the experts a
routing hits, and the floors (bytes at the copy bandwidth, flops at the fp8 rate).

Shapes come from w4afp8_jax.shapes.DEEPSEEK_V3_TP4 (what one GPU holds of DeepSeek-V3's routed
experts when the seed serves it with --tp 4); --dry-run uses DRY_RUN, small enough for the
reference path on a CPU. The data is random and never all zeros (docs/numerics.md): int4
bytes uniform over all 256 values, positive group scales around 0.005, Gaussian activations.
"""

from __future__ import annotations

import math

import timing  # noqa: F401 - first: the JAX allocator flag and the import path

import jax
import jax.numpy as jnp
import numpy as np

import w4afp8_jax
from w4afp8_jax import W4Weights
from w4afp8_jax.shapes import DEEPSEEK_V3_TP4, MoEShape

FP8 = jnp.float8_e4m3fn
GROUP_SIZE = 128  # input channels per weight scale in W4AFP8 checkpoints (docs/numerics.md)
SCALE_BYTES = 4   # our group scales are f32 (the seed keeps bf16)
L2_BYTES = 60 * 2**20  # H200 (the H100 has 50 MB)
DRY_RUN = MoEShape("dry-run", experts=16, hidden=256, intermediate=128, top_k=8, n_group=8, topk_group=4,
                   routed_scaling_factor=2.5)


def shape_for(dry_run: bool) -> MoEShape:
    return DRY_RUN if dry_run else DEEPSEEK_V3_TP4


def gemm_shapes(shape: MoEShape) -> dict[str, tuple[int, int]]:
    """{"gemm1": (N, K), "gemm2": (N, K)} of the layer's two grouped GEMMs."""
    return {"gemm1": shape.gemm1(), "gemm2": shape.gemm2()}


# --------------------------------------------------------------------------- floors

def weight_bytes_per_expert(n: int, k: int) -> int:
    """int4 bytes plus f32 group-scale bytes of one expert's [N, K] weight matrix."""
    return n * k // 2 + n * (k // GROUP_SIZE) * SCALE_BYTES


def expected_experts_hit(tokens: int, experts: int, top_k: int) -> float:
    """Expected distinct experts hit by `tokens` tokens under uniform top-k routing:
    E (1 - (1 - k/E)^B) (each expert is missed by one token with probability 1 - k/E)."""
    return experts * (1.0 - (1.0 - top_k / experts) ** tokens)


def experts_hit(ids, num_experts: int) -> int:
    """Distinct experts among the ids in [0, num_experts) (any shape)."""
    ids = np.asarray(ids).ravel()
    return int(np.count_nonzero(np.bincount(ids[(ids >= 0) & (ids < num_experts)], minlength=num_experts)))


def gemm_floor(hit: float, rows: int, n: int, k: int, rates: dict) -> dict:
    """Floors of one grouped GEMM, in microseconds: memory (int4 + scale bytes of the experts
    hit, fp8 rows read, bf16 output written, at the measured copy bandwidth), compute (2 rows N
    K at the measured fp8 rate, None without one) and their maximum."""
    weight_bytes = hit * weight_bytes_per_expert(n, k)
    io_bytes = rows * k + rows * n * 2
    floors = {"weight_bytes": weight_bytes, "io_bytes": io_bytes, "flops": 2 * rows * n * k,
              "weight_floor_us": weight_bytes / rates["copy_bytes_per_s"] * 1e6,
              "mem_floor_us": (weight_bytes + io_bytes) / rates["copy_bytes_per_s"] * 1e6,
              "compute_floor_us": (2 * rows * n * k / rates["fp8_flops_per_s"] * 1e6
                                   if rates.get("fp8_flops_per_s") else None)}
    floors["floor_us"] = max(v for v in (floors["mem_floor_us"], floors["compute_floor_us"]) if v is not None)
    return floors


def fractions(us: float | None, floors: dict, rates: dict) -> dict:
    """What a time of `us` microseconds reaches: of the memory floor, and of the fp8 rate."""
    if not us:
        return {"mem_fraction": None, "fp8_fraction": None}
    return {"mem_fraction": floors["mem_floor_us"] / us,
            "fp8_fraction": (floors["flops"] / (us * 1e-6) / rates["fp8_flops_per_s"]
                             if rates.get("fp8_flops_per_s") else None)}


# --------------------------------------------------------------------------- weights

def random_w4_weights(key, num_experts: int, out_features: int, in_features: int) -> W4Weights:
    """Random W4Weights [E, N, K] on the device, in the tiled layout the CUDA kernels read."""
    packed, scales = random_packed_scales(key, (num_experts,), out_features, in_features)
    return W4Weights(packed, scales, GROUP_SIZE, layout="tiled")


def random_packed_scales(key, lead: tuple[int, ...], out_features: int, in_features: int):
    """(packed uint8 [*lead, N, K/2], scales f32 [*lead, N, K/128]): uniformly random bytes and
    scales uniform in [0.0025, 0.0075].

    The bytes are declared to be in the tiled layout (W4Weights.prepare) as they are made:
    tiling permutes the bytes of each expert, and a permutation of independent uniform bytes is
    again independent uniform bytes, so this is exactly the distribution of prepare()d random
    weights, without the transpose (which for 16-24 layers moves 20+ GB). Made one leading
    index at a time (lax.map) so the peak memory is the result plus one expert set."""
    shape = (out_features, in_features // 2)
    groups = (out_features, in_features // GROUP_SIZE)

    def one(k):
        kp, ks = jax.random.split(k)
        words = jax.random.bits(kp, (out_features, in_features // 8), jnp.uint32)  # 4 bytes per random word
        return (jax.lax.bitcast_convert_type(words, jnp.uint8).reshape(shape),
                jax.random.uniform(ks, groups, jnp.float32, 0.0025, 0.0075))

    @jax.jit
    def make(k):  # the reshape inside the program: outside it would copy the result
        packed, scales = jax.lax.map(one, jax.random.split(k, math.prod(lead)))
        return packed.reshape(*lead, *shape), scales.reshape(*lead, *groups)

    return make(key)


# --------------------------------------------------------------------------- routing and activations

def uniform_topk_ids(key, tokens: int, num_experts: int, top_k: int) -> jax.Array:
    """int32 [tokens, top_k]: each token picks top_k distinct experts uniformly at random."""
    return jax.lax.top_k(jax.random.uniform(key, (tokens, num_experts)), top_k)[1].astype(jnp.int32)


def random_topk_weights(key, tokens: int, top_k: int) -> jax.Array:
    """f32 [tokens, top_k], positive, each row summing to 1 (as the renormalized router's)."""
    return jax.nn.softmax(jax.random.normal(key, (tokens, top_k), jnp.float32), axis=-1)


def group_offsets_of(ids, num_experts: int) -> jax.Array:
    """int32 [E+1] exclusive offsets of the expert-sorted rows (the reference `route`)."""
    return w4afp8_jax.route(ids, num_experts, implementation="reference").group_offsets


def random_fp8(key, rows: int, cols: int) -> jax.Array:
    """fp8 e4m3 [rows, cols] of standard normal values (|x| < 448, so none saturates)."""
    return jax.random.normal(key, (rows, cols), jnp.bfloat16).astype(FP8)


def instance_count(tokens: int) -> int:
    """Distinct input sets per problem size: many for small problems (rotation defeats the L2
    and gives the n- and 2n-call programs distinct calls), few for large ones (memory)."""
    return 32 if tokens <= 128 else 4


def weight_set_count(bytes_per_call: float, max_sets: int) -> int:
    """Weight sets to rotate so the weights touched between two uses of one set exceed 4x the L2."""
    return int(min(max_sets, max(1, math.ceil(4 * L2_BYTES / max(bytes_per_call, 1.0)))))


def silu_mul_f32(c1):
    """silu(gate) * up in f32 for [..., 2I] inputs (gate columns first)."""
    inter = c1.shape[-1] // 2
    return jax.nn.silu(c1[..., :inter].astype(jnp.float32)) * c1[..., inter:].astype(jnp.float32)


def calibrate_scales(key, shape: MoEShape, w13: W4Weights, impl: str, x=None) -> tuple[float, float]:
    """Static a1/a2 scales as a checkpoint has them: amax / 448 of the two GEMM inputs on a
    calibration batch (64 Gaussian tokens, or x) under uniform routing."""
    k_x, k_ids = jax.random.split(key)
    if x is None:
        x = jax.random.normal(k_x, (64, shape.hidden), jnp.bfloat16)
    ids = uniform_topk_ids(k_ids, x.shape[0], shape.experts, shape.top_k)
    a1 = float(jnp.max(jnp.abs(x.astype(jnp.float32)))) / 448.0
    routing = w4afp8_jax.route(ids, shape.experts, implementation=impl)
    q1, s1 = w4afp8_jax.gather_quantize(x, routing.positions, a1, implementation=impl)
    c1 = w4afp8_jax.grouped_gemm(q1, s1, w13, routing.group_offsets, implementation=impl)
    a2 = float(jnp.max(jnp.abs(silu_mul_f32(c1)))) / 448.0
    return a1, a2
