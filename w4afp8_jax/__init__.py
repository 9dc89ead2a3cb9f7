"""W4AFP8 Mixture-of-Experts for JAX: int4 expert weights (per-128 group scales) times fp8
activations, with a pure-JAX reference path and CUDA kernels for Hopper GPUs.

The pipeline (SPEC.md section 1) reads like the public names:
deepseek_topk -> route -> gather_quantize -> grouped_gemm -> silu_mul_quantize -> grouped_gemm
-> combine; `moe` runs steps 1-6 as one jit-compatible function.
"""

from ._backend import cuda_unavailable_reason
from .activation import silu_mul_quantize
from .dispatch import combine, gather_quantize
from .expert_parallel import moe_expert_parallel
from .fp8 import quantize_fp8
from .gemm import grouped_gemm
from .moe import moe
from .router import deepseek_topk
from .routing import Routing, route
from .weights import W4Weights, pack_int4, quantize_weights, unpack_int4

__all__ = [
    "Routing", "W4Weights", "combine", "cuda_unavailable_reason", "deepseek_topk", "gather_quantize",
    "grouped_gemm", "moe", "moe_expert_parallel", "pack_int4", "quantize_fp8", "quantize_weights", "route", "silu_mul_quantize",
    "unpack_int4",
]
__version__ = "0.1.0"
