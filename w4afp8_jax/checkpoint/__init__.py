"""Reading int4 routed-expert weights (and activation scales) from safetensors checkpoints.

Two formats load, picked by what the checkpoint declares (each described in its module):
- compressed-tensors "pack-quantized" (`compressed_tensors`): config.json's
  quantization_config says quant_method "compressed-tensors" (llm-compressor's W4AFP8: int4
  group-128 weights packed eight per int32, dynamic per-token fp8 activations; vLLM serves it);
- W4AFP8 (`w4afp8`), otherwise: TensorRT-LLM's mixed-precision DeepSeek-V3/R1 checkpoints (int8
  with two int4 per byte, static activation scales in act_scales.safetensors), and what
  `python -m w4afp8_jax.convert` writes.

Both load into the same W4Weights: the same quantized values give the same bytes and scales.
Files are memory-mapped: only the bytes of the requested layers, experts and tensor-parallel
slice are read.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable, Sequence

from jax.sharding import Sharding

from . import compressed_tensors, w4afp8
from .experts import ACTIVATION_SCALINGS, ExpertFormat, MoEExperts, load_experts, replicated
from .files import ACT_SCALES_FILE, EXPERT_MODULE, EXPERT_WEIGHT, INDEX_FILE, Checkpoint, SafetensorsFile
from .w4afp8 import GROUP_SIZE, INPUT_SCALE, QUANT_ALGO, QUANT_CONFIG_FILE

__all__ = [
    "ACTIVATION_SCALINGS", "ACT_SCALES_FILE", "EXPERT_MODULE", "EXPERT_WEIGHT", "GROUP_SIZE", "INDEX_FILE",
    "INPUT_SCALE", "QUANT_ALGO", "QUANT_CONFIG_FILE", "Checkpoint", "ExpertFormat", "MoEExperts", "SafetensorsFile",
    "load_moe_experts", "replicated",
]


def load_moe_experts(path: str | os.PathLike, *, layers: Iterable[int] | None = None, tp_size: int = 1,
                     tp_rank: int = 0, expert_ids: Sequence[int] | None = None,
                     sharding: Sharding | Callable[[str, tuple[int, ...]], Sharding] | None = None,
                     layout: str = "tiled", progress: bool | None = None) -> MoEExperts:
    """Loads the routed experts of a checkpoint directory, W4AFP8 or compressed-tensors
    pack-quantized (this package's doc says which is read).

    layers: checkpoint layer ids to load, in order; None loads every layer with routed-expert
        tensors (DeepSeek-V3: layers >= first_k_dense_replace = 3).
    tp_size, tp_rank: tensor parallelism over the intermediate dimension I: rank r of P gets
        gate/up rows [r I/P, (r+1) I/P) and the same range of down's input columns (packed bytes
        and scale columns). I/P must be a multiple of the group size (128).
    expert_ids: the routed experts to load, in this order (expert parallelism); None loads all
        (config.json's n_routed_experts, or every expert the files hold).
    sharding: where the arrays go. None: jax.devices()[0]. A jax.sharding.Sharding: used for the
        [L, E, N, ...] weight arrays (e.g. NamedSharding(mesh, P(None, "ep")) shards experts);
        the [L] scales are replicated on its devices. A callable (name, shape) -> Sharding, with
        name one of "w13.packed", "w13.scales", "w2.packed", "w2.scales", "a1_scale",
        "a2_scale", chooses per array. Each device reads only its block from the files.
    layout: "tiled" (the byte order the CUDA kernels stream, as `W4Weights.prepare()`, done on
        the host while reading; needs group size 128) or "checkpoint" (W4Weights' two codes per
        byte, K contiguous per row). A tiled packed array cannot be split along its last axis
        and only at multiples of 16 rows. A compressed-tensors checkpoint with another group
        size (a multiple of 8) loads with layout="checkpoint", for the reference path only.
    progress: a tqdm progress bar over the tensors read; None shows it when stderr is a
        terminal.

    Returns a MoEExperts: w13 W4Weights [L, E, 2I/P, H], w2 [L, E, H, I/P] (uint8 packed, f32
    scales: bf16 / f16 checkpoint scales widen exactly), a1_scale and a2_scale f32 [L] or None,
    and activation_scaling, what the checkpoint declares.
    - W4AFP8: the activation scales are those of a full load whatever expert_ids, tp_size,
      tp_rank and sharding are: per layer, the max over every one of the layer's experts
      (loaded or not) of the w1/w3 input scales (a1_scale) and of the w2 input scales
      (a2_scale); a rank that took only its own experts' max would saturate inputs the
      one-device layer keeps. So a checkpoint with input scales needs them for every expert,
      also where its weight files hold only some experts; one without has None (dynamic).
    - compressed-tensors: activations are dynamic, so a1_scale = a2_scale = None, and
      `activation_scaling` says how ("per_token" for llm-compressor's W4AFP8). `moe` applies
      per-token scales only when passed `activation_scaling=experts.activation_scaling` (the
      NNX block does it itself), on the reference path so far (a UserWarning says so when
      loading).
    Raises, before reading any weight bytes: ValueError naming the config field of a
    compressed-tensors scheme it cannot run (a format other than pack-quantized, weights not
    4-bit symmetric int with strategy group, a group size not a multiple of 8, act-order
    g_idx, activations not dynamic fp8 per token or per tensor, a routed expert left
    unquantized) and for group size != 128 with layout="tiled"; KeyError naming a missing
    tensor (a W4AFP8 input scale of any expert included, when the checkpoint holds some);
    ValueError / TypeError naming a tensor of the wrong shape or dtype.
    """
    ckpt = Checkpoint(path)
    declared = compressed_tensors.declared(ckpt.config())
    fmt = compressed_tensors.expert_format(ckpt) if declared else w4afp8.expert_format(ckpt)
    experts = load_experts(ckpt, fmt, layers=layers, tp_size=tp_size, tp_rank=tp_rank, expert_ids=expert_ids,
                           sharding=sharding, layout=layout, progress=progress)
    if fmt.activation_scaling == "per_token":
        warnings.warn(f"{ckpt.path}: the checkpoint declares dynamic per-token fp8 activation scales: pass "
                      "activation_scaling=experts.activation_scaling ('per_token') to moe and the multi-GPU layers "
                      "(the NNX block does); the CUDA kernels take per-tensor scales only so far, and without it "
                      "the layers run with dynamic per-tensor ones", UserWarning, stacklevel=2)
    return experts
