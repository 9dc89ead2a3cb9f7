"""The W4AFP8 DeepSeek-V3/R1 checkpoint format (the published W4AFP8 DeepSeek-R1 model, made by
TensorRT-LLM's mixed-precision MoE quantization; SGLang loads it as `w4afp8`), per MoE layer L
and routed expert e:

- `model.layers.{L}.mlp.experts.{e}.{gate,up,down}_proj.weight`: int8 [N, K/2], two signed int4
  per byte along K, element 2i in the low nibble (gate/up: [I, H/2]; down: [H, I/2]).
- `....{gate,up,down}_proj.weight_scale_inv`: f32 [N, K/128], a multiplier despite its name
  (w = int4 * scale).
- `model.layers.{L}.mlp.experts.{e}.{w1,w3,w2}.input_scale`: f32 [1] static activation scales
  (amax / 448) of the gate, up and down inputs, in the side file `act_scales.safetensors`; a
  layer's scale per GEMM is the max over all of its experts.
- `model.safetensors.index.json` maps every tensor name to its shard file;
  `hf_quant_config.json` says {"quantization": {"quant_algo": "MIXED_PRECISION"}}; config.json
  has no quantization_config.
"""

from __future__ import annotations

import json
import math

import numpy as np

from .experts import ExpertFormat
from .files import Checkpoint

GROUP_SIZE = 128  # implied by the format: one scale per 128 input channels
QUANT_CONFIG_FILE = "hf_quant_config.json"
QUANT_ALGO = "MIXED_PRECISION"
INPUT_SCALE = "model.layers.{layer}.mlp.experts.{expert}.{gemm}.input_scale"


def expert_format(ckpt: Checkpoint) -> ExpertFormat:
    """The W4AFP8 format; raises ValueError when hf_quant_config.json declares another
    quant_algo."""
    quant_config = ckpt.path / QUANT_CONFIG_FILE
    if quant_config.exists():
        algo = json.loads(quant_config.read_text()).get("quantization", {}).get("quant_algo")
        if algo != QUANT_ALGO:
            raise ValueError(f"{quant_config}: quant_algo is {algo!r}, expected {QUANT_ALGO!r} (W4AFP8 routed experts)")
    return ExpertFormat(
        name="W4AFP8", packed="weight", scale="weight_scale_inv", packed_dtypes=(np.int8, np.uint8),
        values_per_element=2, group_size=GROUP_SIZE, activation_scales=_activation_scales,
        packed_hint="; an FP8 or bf16 checkpoint must be converted first (python -m w4afp8_jax.convert SRC DST)")


def _activation_scales(ckpt: Checkpoint, layer_ids, num_experts: int):
    """(a1 [L], a2 [L]) f32 as the max over all `num_experts` experts of each layer (not only
    the loaded ones, so that expert parallelism never changes a layer's numbers), or
    (None, None) when the checkpoint has no input scales at all."""
    names = {gemm: [[INPUT_SCALE.format(layer=layer, expert=e, gemm=gemm) for e in range(num_experts)]
                    for layer in layer_ids] for gemm in ("w1", "w3", "w2")}
    if not any(n in ckpt for rows in names.values() for row in rows for n in row):
        return None, None

    def value(name):
        try:
            v = np.asarray(ckpt.tensor(name), np.float64)
        except KeyError as err:  # missing from the index or from the file it names
            raise KeyError(f"{err.args[0]}; other input scales are there, and a layer's activation scales are the "
                           f"max over all of its {num_experts} experts' input scales, loaded experts or not") from None
        if v.size != 1:
            raise ValueError(f"{name}: expected one value (shape [1]), got shape {list(v.shape)}")
        v = float(v.reshape(()))
        if not math.isfinite(v) or v <= 0:
            raise ValueError(f"{name}: input scale must be finite and positive, got {v}")
        return v

    a1 = [max(value(n) for gemm in ("w1", "w3") for n in names[gemm][i]) for i in range(len(layer_ids))]
    a2 = [max(value(n) for n in names["w2"][i]) for i in range(len(layer_ids))]
    return np.asarray(a1, np.float32), np.asarray(a2, np.float32)
