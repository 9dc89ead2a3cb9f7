"""W4AFP8 Mixture-of-Experts for JAX: int4 expert weights (per-128 group scales) times fp8
activations, with a pure-JAX reference path and CUDA kernels for Hopper GPUs.

The pipeline (docs/numerics.md) reads like the public names:
deepseek_topk -> route -> gather_quantize -> grouped_gemm -> silu_mul_quantize -> grouped_gemm
-> combine; `moe` runs steps 1-6 as one jit-compatible function.
"""

from ._backend import GemmConfig, cuda_unavailable_reason, grouped_gemm_configs, grouped_gemm_default_config
from ._backend import resolve as resolve_implementation
from .expert_parallel import moe_expert_parallel
from .fp8 import quantize_fp8
from .moe import moe
from .ops.combine import combine
from .ops.deepseek_topk import deepseek_topk
from .ops.gather_quantize import gather_quantize
from .ops.grouped_gemm import grouped_gemm
from .ops.route import Routing, route
from .ops.silu_mul_quantize import silu_mul_quantize
from .tensor_parallel import moe_tensor_parallel, shard_tensor_parallel, tensor_parallel_slice
from .weights import W4Weights, pack_int4, quantize_weights, unpack_int4
from .checkpoint import MoEExperts, load_moe_experts
from .ragged_dot import ragged_dot
from . import export  # registers the pytrees above with jax.export

__all__ = [
    "export", "MoEExperts", "load_moe_experts", "ragged_dot",
    "GemmConfig", "Routing", "W4Weights", "combine", "cuda_unavailable_reason", "deepseek_topk", "gather_quantize",
    "grouped_gemm", "grouped_gemm_configs", "grouped_gemm_default_config", "moe", "moe_expert_parallel", "moe_tensor_parallel", "pack_int4",
    "quantize_fp8", "quantize_weights", "resolve_implementation", "route", "shard_tensor_parallel", "silu_mul_quantize",
    "tensor_parallel_slice", "unpack_int4",
]
__version__ = "0.1.0"
