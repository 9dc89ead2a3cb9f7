"""Converts a bf16 or FP8 block-scaled DeepSeek-V3/R1 checkpoint into the W4AFP8 layout.

    python -m w4afp8_jax.convert SRC DST [--calibration INPUTS.safetensors]

Only the routed experts' gate/up/down weights change (see `convert`); every other tensor is
copied unchanged, shard by shard under the same file names; the index is rewritten and
`hf_quant_config.json` added, the layout `w4afp8_jax.load_moe_experts` (and SGLang's w4afp8
loader) reads. The command prints a one-line summary of what it wrote (`ConversionSummary`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

from .checkpoint import (ACT_SCALES_FILE, EXPERT_WEIGHT, GROUP_SIZE, INDEX_FILE, INPUT_SCALE, QUANT_ALGO,
                         QUANT_CONFIG_FILE, Checkpoint, SafetensorsFile)
from .ops.deepseek_topk import deepseek_topk
from .weights import INT4_MAX, INT4_MIN, pack_int4

FP8_MAX = 448.0
BLOCK = 128  # DeepSeek-V3's FP8 weights: one weight_scale_inv per 128 x 128 block
_EXPERT_TENSOR_RE = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.(weight|weight_scale_inv)$")
_ROUTED = EXPERT_WEIGHT.format(layer="{L}", expert="{e}", proj="{gate,up,down}", tensor="")
_ROUTER = "model.layers.{L}.mlp.gate."
# --help's list of what the converter reads and writes (the names come from the patterns above).
_TENSORS_HELP = f"""\
source tensors read (per MoE layer L, routed expert e):
  {_ROUTED}weight
      bf16 / f16 / f32 [N, K], or FP8 e4m3 [N, K] (DeepSeek-V3's format) with
  {_ROUTED}weight_scale_inv
      f32 [ceil(N/128), ceil(K/128)], one multiplier per 128 x 128 block
  with --calibration also the router: {_ROUTER}weight [E, H] and
  {_ROUTER}e_score_correction_bias [E] (zeros when absent), and config.json's
  n_routed_experts, num_experts_per_tok, n_group, topk_group
written: the same names, int8 [N, K/2] (two int4 per byte) and f32 weight_scale_inv [N, K/128]
  (scale = amax / 7 per 128 inputs); with --calibration, {ACT_SCALES_FILE} with
  {INPUT_SCALE.format(layer="{L}", expert="{e}", gemm="{w1,w3,w2}")} f32 [1];
  every other tensor and file is copied unchanged
"""


def check_source_weight(ckpt: Checkpoint, name: str) -> None:
    """A source weight's dtype and shape (and its block scales' shape), from the headers."""
    dtype, shape = ckpt.dtype(name), ckpt.shape(name)
    if len(shape) != 2:
        raise ValueError(f"{name}: expected a matrix, got shape {list(shape)}")
    if dtype in (np.int8, np.uint8):
        raise TypeError(f"{name}: already int8 (packed int4?); expected a bf16 or FP8 source checkpoint")
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"{name}: expected bf16, f16, f32 or FP8 weights, got {dtype}")
    if dtype.itemsize == 1:
        scale_name = name + "_scale_inv"
        if scale_name not in ckpt:
            raise KeyError(f"tensor {scale_name} not found in {ckpt.path} (the block scales of the FP8 weight {name})")
        blocks = tuple(math.ceil(d / BLOCK) for d in shape)
        if ckpt.shape(scale_name) != blocks:
            raise ValueError(f"{scale_name}: expected shape {list(blocks)} (128 x 128 blocks of {name} {list(shape)}), "
                             f"got {list(ckpt.shape(scale_name))}")


def source_weight(ckpt: Checkpoint, name: str) -> np.ndarray:
    """float64 [N, K]: a bf16/f16/f32 weight as is, or an FP8 (e4m3) weight times its
    `weight_scale_inv` [ceil(N/128), ceil(K/128)] block scales (exact in float64: a 4-bit
    significand times a 24-bit one)."""
    check_source_weight(ckpt, name)
    w = ckpt.tensor(name)
    out = np.asarray(w, np.float64)
    if w.dtype.itemsize == 1:  # fp8: block-scaled
        n, k = w.shape
        scale = np.asarray(ckpt.tensor(name + "_scale_inv"), np.float64)
        out *= np.repeat(np.repeat(scale, BLOCK, axis=0), BLOCK, axis=1)[:n, :k]
    if not np.all(np.isfinite(out)):
        raise ValueError(f"{name}: the weight holds non-finite values")
    return out


def quantize_int4(w: np.ndarray, name: str = "w") -> tuple[np.ndarray, np.ndarray]:
    """The published W4AFP8 recipe on float weights [N, K]: per row and 128 input channels,
    scale = amax / 7 (rounded to f32; an all-zero group gets 1) and q = clamp(round(w / scale),
    -8, 7), rounding half to even, in float64 with the f32 scale. The group's largest element
    maps to +-7, so codes span -7..7 and nothing clips; |w - q scale| <= scale / 2.

    Returns (packed int8 [N, K/2], element 2i in the low nibble; scales f32 [N, K/128]).
    """
    n, k = w.shape
    if k % GROUP_SIZE:
        raise ValueError(f"{name}: K = {k} is not a multiple of {GROUP_SIZE}")
    grouped = np.asarray(w, np.float64).reshape(n, k // GROUP_SIZE, GROUP_SIZE)
    amax = np.max(np.abs(grouped), axis=-1)
    scales = np.where(amax > 0, amax / INT4_MAX, 1.0).astype(np.float32)
    q = np.clip(np.rint(grouped / scales[..., None].astype(np.float64)), INT4_MIN, INT4_MAX).astype(np.int8)
    return pack_int4(q.reshape(n, k)).view(np.int8), scales


def calibrate(ckpt: Checkpoint, layer: int, inputs, num_experts: int, config: Mapping) -> dict[str, np.ndarray]:
    """Input scales of one MoE layer from calibration inputs (the hidden states entering its MoE
    block, [T, H]): tokens are routed with the checkpoint's router (gate.weight and
    e_score_correction_bias, DeepSeek-V3's grouped top-k with config.json's n_group,
    topk_group, num_experts_per_tok); expert e's w1/w3 input scale is amax|x| / 448 over the
    tokens routed to it and its w2 input scale amax|silu(x Wg^T) * (x Wu^T)| / 448 with the
    source (unquantized) weights. An expert no token reaches gets the layer's largest scales,
    so the per-layer maximum a loader takes is unchanged."""
    x = np.asarray(inputs, np.float64)
    prefix = f"model.layers.{layer}.mlp.gate."
    gate = source_weight(ckpt, prefix + "weight")
    if gate.shape != (num_experts, x.shape[1]):
        raise ValueError(f"{prefix}weight: expected shape {[num_experts, x.shape[1]]}, got {list(gate.shape)}")
    bias = (np.asarray(ckpt.tensor(prefix + "e_score_correction_bias"), np.float32)
            if prefix + "e_score_correction_bias" in ckpt else np.zeros(num_experts, np.float32))
    logits = jnp.asarray((x @ gate.T).astype(np.float32))
    _, ids = deepseek_topk(logits, jnp.asarray(bias), top_k=int(config.get("num_experts_per_tok", 8)),
                           n_group=int(config.get("n_group", 8)), topk_group=int(config.get("topk_group", 4)))
    ids = np.asarray(ids)
    a13 = np.zeros(num_experts)
    a2 = np.zeros(num_experts)
    for e in range(num_experts):
        xe = x[np.any(ids == e, axis=1)]
        if not len(xe):
            continue
        g = xe @ source_weight(ckpt, EXPERT_WEIGHT.format(layer=layer, expert=e, proj="gate", tensor="weight")).T
        u = xe @ source_weight(ckpt, EXPERT_WEIGHT.format(layer=layer, expert=e, proj="up", tensor="weight")).T
        a13[e] = np.max(np.abs(xe))
        a2[e] = np.max(np.abs(g / (1 + np.exp(-g)) * u))
    a13[a13 == 0], a2[a2 == 0] = a13.max(), a2.max()
    if a13.max() == 0 or a2.max() == 0:
        raise ValueError(f"calibration[{layer}]: the inputs give an all-zero activation range")
    out = {}
    for e in range(num_experts):
        for gemm, amax in (("w1", a13[e]), ("w3", a13[e]), ("w2", a2[e])):
            out[INPUT_SCALE.format(layer=layer, expert=e, gemm=gemm)] = np.asarray([amax / FP8_MAX], np.float32)
    return out


@dataclasses.dataclass(frozen=True)
class ConversionSummary:
    """What `convert` wrote; str() is the command's one-line report.

    dst: the new checkpoint directory. layers: {MoE layer: routed experts}. quantized: routed-
    expert weights made int4; source_dtypes: their dtypes in the source (names, e.g.
    "float8_e4m3fn"). copied: other tensors copied unchanged. files: .safetensors files
    written. size: bytes of tensor data written. act_scales: whether `act_scales.safetensors`
    (static input scales, from calibration) was written.
    """

    dst: Path
    layers: dict[int, int]
    quantized: int
    source_dtypes: tuple[str, ...]
    copied: int
    files: int
    size: int
    act_scales: bool

    def __str__(self) -> str:
        ids = list(self.layers)
        span = f"{ids[0]}-{ids[-1]}" if ids == list(range(ids[0], ids[-1] + 1)) else ", ".join(map(str, ids))
        scales = (f"static activation scales in {ACT_SCALES_FILE}" if self.act_scales else
                  "no activation scales (dynamic at run time; --calibration writes static ones)")
        experts = sorted(set(self.layers.values()))
        per_layer = (f"{experts[0]} routed experts each" if len(experts) == 1 else
                     f"{experts[0]}-{experts[-1]} routed experts per layer")
        return (f"wrote W4AFP8 checkpoint {self.dst}: {len(ids)} MoE layers ({span}), "
                f"{per_layer}, {self.quantized} expert weights "
                f"({'/'.join(self.source_dtypes)}) quantized to int4, {self.copied} other tensors copied, "
                f"{self.files} files, {self.size / 2**20:.1f} MiB; {scales}")


def convert(src: str | os.PathLike, dst: str | os.PathLike, *, calibration: Mapping[int, np.ndarray] | None = None,
            progress: bool | None = None) -> ConversionSummary:
    """Writes the W4AFP8 version of checkpoint directory `src` into the new directory `dst`.

    Routed-expert weights `model.layers.{L}.mlp.experts.{e}.{gate,up,down}_proj.weight` (bf16,
    f16, f32, or FP8 e4m3 with a `weight_scale_inv` per 128 x 128 block, DeepSeek-V3's format)
    become int4 by `quantize_int4` (scale = amax / 7 per 128 input channels): int8 [N, K/2] and
    f32 `weight_scale_inv` [N, K/128]. Every other tensor (attention, dense layers, shared
    experts, router) is copied bit for bit, in shards of the same names. The index is rewritten,
    `hf_quant_config.json` says {"quantization": {"quant_algo": "MIXED_PRECISION"}}, and
    config.json loses its quantization_config (the W4AFP8 checkpoints' convention); other
    files are copied.

    calibration: {layer: inputs [T, H]} for every MoE layer, the hidden states entering that
        layer's MoE block; `act_scales.safetensors` then holds static input scales (amax / 448,
        see `calibrate`). Without calibration no activation scales are written:
        `load_moe_experts` returns a1_scale = a2_scale = None and `moe` computes dynamic
        per-tensor scales (amax / 448 of each GEMM input, on the device, per call).
    progress: a tqdm bar over the expert weights; None shows it when stderr is a terminal.

    Returns a ConversionSummary. Raises (before writing anything) FileExistsError when dst is
    not empty, KeyError naming a missing tensor, TypeError / ValueError naming a source weight
    of the wrong dtype or shape or a calibration without inputs for some MoE layer; ValueError
    naming a weight with non-finite values while converting.
    """
    if not Path(src).is_dir():  # named as convert's argument (Checkpoint would say `path`)
        raise FileNotFoundError(f"src: {src} is not a checkpoint directory")
    ckpt = Checkpoint(src)
    dst = Path(dst)
    if dst.resolve() == ckpt.path.resolve():
        raise ValueError("dst must differ from src")
    if dst.exists() and any(dst.iterdir()):
        raise FileExistsError(f"dst: {dst} exists and is not empty")
    layers = ckpt.expert_layers()
    if not layers:
        raise KeyError(f"no routed-expert tensors (model.layers.L.mlp.experts.e.gate_proj.weight) in {ckpt.path}")
    config = ckpt.config()
    if calibration is not None:
        missing = sorted(set(layers) - set(calibration))
        if missing:
            raise ValueError(f"calibration has no inputs for MoE layers {missing}")
    expert_weights = [n for n in ckpt.weight_map if _EXPERT_TENSOR_RE.match(n) and n.endswith(".weight")]
    for name in expert_weights:  # every source weight checked before anything is written
        check_source_weight(ckpt, name)
    dst.mkdir(parents=True, exist_ok=True)

    if progress is None:
        progress = sys.stderr.isatty()
    from tqdm.auto import tqdm

    files = sorted(set(ckpt.weight_map.values()) - {ACT_SCALES_FILE})
    weight_map: dict[str, str] = {}
    total_size = copied = 0
    with tqdm(total=len(expert_weights), desc="quantizing routed experts", unit="tensor", disable=not progress) as bar:
        for file_name in files:
            file: SafetensorsFile = ckpt.file(file_name)
            out: dict[str, np.ndarray] = {}
            for name in file.names():
                match = _EXPERT_TENSOR_RE.match(name)
                if match and match[4] == "weight_scale_inv":
                    continue  # the FP8 block scales: replaced by the int4 group scales
                if match:
                    out[name], out[name + "_scale_inv"] = quantize_int4(source_weight(ckpt, name), name)
                    bar.update(1)
                else:
                    out[name] = np.ascontiguousarray(file.tensor(name))
                    copied += 1
            save_file(out, dst / file_name)
            weight_map.update(dict.fromkeys(out, file_name))
            total_size += sum(a.nbytes for a in out.values())
            del out

    if calibration is not None:
        scales: dict[str, np.ndarray] = {}
        for layer, num_experts in layers.items():
            scales.update(calibrate(ckpt, layer, calibration[layer], int(config.get("n_routed_experts", num_experts)),
                                    config))
        save_file(scales, dst / ACT_SCALES_FILE)
        weight_map.update(dict.fromkeys(scales, ACT_SCALES_FILE))
        total_size += sum(a.nbytes for a in scales.values())

    (dst / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total_size},
                                              "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    (dst / QUANT_CONFIG_FILE).write_text(json.dumps({"quantization": {"quant_algo": QUANT_ALGO}}, indent=2))
    if config:
        config.pop("quantization_config", None)
        (dst / "config.json").write_text(json.dumps(config, indent=2))
    for path in ckpt.path.iterdir():
        skip = {INDEX_FILE, QUANT_CONFIG_FILE, ACT_SCALES_FILE, "config.json", *files}
        if path.is_file() and path.name not in skip and not path.name.endswith(".safetensors"):
            shutil.copy2(path, dst / path.name)
    return ConversionSummary(dst=dst, layers=layers, quantized=len(expert_weights),
                             source_dtypes=tuple(sorted({str(ckpt.dtype(n)) for n in expert_weights})),
                             copied=copied, files=len(set(weight_map.values())), size=total_size,
                             act_scales=calibration is not None)


def _read_calibration(path: str) -> dict[int, np.ndarray]:
    """{layer: inputs} from a .safetensors or .npz file with arrays named `layers.{L}`."""
    if path.endswith(".npz"):
        with np.load(path) as f:
            arrays = {k: f[k] for k in f.files}
    else:
        file = SafetensorsFile(path)
        arrays = {k: file.tensor(k) for k in file.names()}
    out = {}
    for name, value in arrays.items():
        match = re.fullmatch(r"layers\.(\d+)", name)
        if not match:
            raise ValueError(f"{path}: calibration arrays must be named layers.<L>, got {name!r}")
        out[int(match[1])] = value
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m w4afp8_jax.convert", description=__doc__.splitlines()[0],
                                epilog=_TENSORS_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="checkpoint directory (bf16 or FP8 block-scaled, safetensors)")
    p.add_argument("dst", help="new directory for the W4AFP8 checkpoint")
    p.add_argument("--calibration", help="a .safetensors or .npz file with the MoE-block inputs of every MoE layer, "
                                         "arrays named layers.<L> of shape [tokens, hidden]; without it no static "
                                         "activation scales are written (dynamic scales at run time)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    try:
        with jax.default_device(jax.devices("cpu")[0]):
            summary = convert(args.src, args.dst,
                              calibration=_read_calibration(args.calibration) if args.calibration else None,
                              progress=False if args.no_progress else None)
    except (OSError, KeyError, TypeError, ValueError) as e:  # the checks' messages name the tensor or path
        p.exit(1, f"{p.prog}: error: {e.args[0] if isinstance(e, KeyError) and e.args else e}\n")
    print(summary)  # on stdout, whether or not a progress bar showed on stderr


if __name__ == "__main__":
    main()
