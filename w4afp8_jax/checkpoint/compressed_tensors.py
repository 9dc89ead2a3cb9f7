"""compressed-tensors checkpoints with int4 routed experts (llm-compressor writes them, vLLM
serves them), in the "pack-quantized" format.

config.json declares the quantization (a serialized compressed_tensors QuantizationConfig):

    "quantization_config": {"quant_method": "compressed-tensors", "format": "pack-quantized",
      "config_groups": {"group_0": {"targets": ["Linear"], "weights": {"num_bits": 4,
          "type": "int", "symmetric": true, "strategy": "group", "group_size": 128,
          "actorder": null, "dynamic": false, ...}, "input_activations": {"num_bits": 8,
          "type": "float", "symmetric": true, "strategy": "token", "dynamic": true, ...},
          "output_activations": null}},
      "ignore": ["lm_head", ...], ...}

(the "W4AFP8" preset of compressed_tensors/quantization/quant_scheme.py, saved with
quantization_format="pack-quantized" as llm-compressor's examples/quantization_w4a8_fp8/
llama3_example.py does for vLLM). Per quantized linear [N, K], e.g. the routed expert
`model.layers.{L}.mlp.experts.{e}.gate_proj`:

- `{module}.weight_packed`: int32 [N, K/8]. pack_to_int32 (vllm-project/compressed-tensors,
  src/compressed_tensors/compressors/pack_quantized/helpers.py; earlier in
  compressors/quantized_compressors/pack_quantized.py) stores the int4 code q in [-8, 7]
  unsigned, u = q + 8 (offset 1 << (num_bits - 1)), packed along K: element 8c + i of a row in
  bits [4i, 4i + 4) of int32 column c.
- `{module}.weight_scale`: [N, K/group_size] in the model's dtype (bf16 typically); symmetric,
  so w = q * scale (PackedQuantizationCompressor.decompress, no zero point).
- `{module}.weight_shape`: int [2], the unpacked [N, K].
- dynamic activations have no scale tensors.

So a row's little-endian bytes are W4Weights' packing (two codes per byte, element 2i in the low
nibble) of u, and since u = q + 8 differs from q's two's-complement nibble in bit 3 only,
XORing every byte with 0x88 gives W4Weights' bytes: the same dequantized values, exactly.

Which scheme applies to a module follows compressed_tensors' apply_quantization_config
(quantization/lifecycle/apply.py) and utils/match.py: every group's targets map to it (a later
group wins a repeated target); an `ignore` match leaves the module unquantized; of the matching
targets, exact names come first, then "re:" regexes (re.match on the module name), each sorted,
then class names ("Linear": every projection here is a torch.nn.Linear).
"""

from __future__ import annotations

import re

import numpy as np

from .experts import ExpertFormat, check_projection
from .files import EXPERT_WEIGHT, Checkpoint

QUANT_METHOD = "compressed-tensors"
FORMAT = "pack-quantized"
_WHERE = "config.json quantization_config"
_ROUTED = re.compile(r"^(model\.layers\.\d+\.mlp\.experts\.\d+\.(?:gate|up|down)_proj)\.(?:weight|weight_packed)$")


def declared(config: dict) -> bool:
    """Whether config.json (as a dict) declares a compressed-tensors quantization."""
    qc = config.get("quantization_config")
    return isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD


def expert_format(ckpt: Checkpoint) -> ExpertFormat:
    """The routed experts' format from config.json's quantization_config.

    Every routed-expert projection the checkpoint holds must fall in a config group (not
    ignored), and all of them in groups of one scheme: "pack-quantized", int4 symmetric weights
    with strategy "group" and a group_size that is a multiple of 8 (whole int32 words; the
    tiled layout and the CUDA path need 128), no act-order g_idx (actorder "weight" / "static"
    changes only the calibration and is fine), and fp8 (num_bits 8, type float, symmetric)
    input activations with dynamic scales, strategy "token" (per-token, recorded as
    activation_scaling = "per_token") or "tensor". Raises ValueError naming the config field of
    any other scheme, or the projection left unquantized; KeyError when there is no routed
    expert. Reads config.json and the index only.
    """
    qc = ckpt.config()["quantization_config"]
    sparsity = qc.get("sparsity_config") or {}
    if sparsity.get("format") not in (None, "dense"):
        raise ValueError(f"{_WHERE}.sparsity_config: format {sparsity['format']!r} (sparse weights) is not supported")
    if qc.get("transform_config"):
        raise ValueError(f"{_WHERE}.transform_config: weights rotated by transforms are not supported")
    if not isinstance(qc.get("config_groups"), dict) or not qc["config_groups"]:
        raise ValueError(f"{_WHERE}.config_groups: expected a non-empty mapping of schemes, "
                         f"got {qc.get('config_groups')!r}")
    modules = sorted({m[1] for m in map(_ROUTED.match, ckpt.weight_map) if m})
    if not modules:
        example = EXPERT_WEIGHT.format(layer="L", expert="e", proj="gate", tensor="weight_packed")
        raise KeyError(f"no routed-expert tensors ({example}) in {ckpt.path}")
    schemes: dict[str, tuple[int, str]] = {}  # config group -> (group_size, activation_scaling)
    users: dict[tuple[int, str], tuple[str, str]] = {}  # scheme -> (first module, its group)
    for module in modules:
        group = _group_of(qc, module)
        if group not in schemes:
            where = f"{_WHERE}.config_groups.{group}"
            scheme = qc["config_groups"][group]
            schemes[group] = (_weight_group_size(where, scheme, qc.get("format")),
                              _activation_scaling(where, scheme.get("input_activations")))
            if scheme.get("output_activations"):
                raise ValueError(f"{where}.output_activations: quantized layer outputs are not supported")
        users.setdefault(schemes[group], (module, group))
    if len(users) > 1:
        raise ValueError("the routed experts fall in config groups of different schemes: " + "; ".join(
            f"{m} in {g} (group_size {gs}, {scaling} activations)" for (gs, scaling), (m, g) in users.items()))
    ((group_size, scaling),) = users
    return _format(group_size, scaling)


def _format(group_size: int, activation_scaling: str = "per_tensor") -> ExpertFormat:
    return ExpertFormat(
        name="compressed-tensors", packed="weight_packed", scale="weight_scale", packed_dtypes=(np.int32,),
        values_per_element=8, group_size=group_size, nibble_xor=0x88, activation_scaling=activation_scaling,
        check_projection=_check_weight_shape)


def dequantized_weight(ckpt: Checkpoint, module: str) -> np.ndarray:
    """float64 [N, K]: the pack-quantized int4 linear `module` (e.g. a shared expert's
    projection) dequantized, q * scale (exact in float64). Its config group must hold weights
    `expert_format` accepts (its activations do not matter here). Raises as `expert_format`
    does, and KeyError / TypeError / ValueError naming a missing or mis-shaped tensor."""
    qc = ckpt.config()["quantization_config"]
    group = _group_of(qc, module)
    group_size = _weight_group_size(f"{_WHERE}.config_groups.{group}", qc["config_groups"][group], qc.get("format"))
    packed = f"{module}.weight_packed"
    if packed not in ckpt:
        raise KeyError(f"tensor {packed} not found in {ckpt.path}")
    n, k = ckpt.shape(packed)[0], 8 * ckpt.shape(packed)[-1]
    check_projection(ckpt, _format(group_size), module, (n, k))
    stored = ckpt.tensor(packed).view(np.uint8)  # [N, K/2], element 2i in the low nibble
    q = np.stack([stored & 0xF, stored >> 4], axis=-1).reshape(n, k).astype(np.float64) - 8
    scale = np.asarray(ckpt.tensor(f"{module}.weight_scale"), np.float64)
    return (q.reshape(n, k // group_size, group_size) * scale[..., None]).reshape(n, k)


def _matches(module: str, target: str) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], module) is not None
    return target in (module, "Linear")


def _group_of(qc: dict, module: str) -> str:
    """The config group whose scheme quantizes `module` (module doc); ValueError when `ignore`
    or the targets leave it unquantized."""
    if any(_matches(module, t) for t in qc.get("ignore") or ()):
        raise ValueError(f"{module}: matched by {_WHERE}.ignore, so it is not int4 quantized")
    # A group is a scheme with its targets, or a preset name mapped to targets.
    target_group = {t: group for group, scheme in qc["config_groups"].items()
                    for t in (scheme.get("targets", ()) if isinstance(scheme, dict) else scheme)}
    ordered = sorted(target_group, key=lambda t: ("re:" in t, t))
    by_name = [t for t in ordered if t != "Linear" and _matches(module, t)]
    matched = by_name + (["Linear"] if "Linear" in target_group else [])
    if not matched:
        raise ValueError(f"{module}: no target of {_WHERE}.config_groups matches it (targets {ordered}), so it is not "
                         "int4 quantized")
    return target_group[matched[0]]


def _lower(args: dict, key: str, default):
    value = args.get(key, default)
    return value.lower() if isinstance(value, str) else value


def _strategy(args: dict):
    """The strategy, inferred from group_size when absent (QuantizationArgs' validator)."""
    strategy, group_size = _lower(args, "strategy", None), args.get("group_size")
    if strategy is None:
        return "tensor" if group_size is None else "channel" if group_size == -1 else "group"
    return strategy


def _weight_group_size(where: str, scheme, default_format) -> int:
    """The group size of a scheme's weights (defaults: QuantizationArgs'); ValueError naming the
    field of a scheme this library cannot run."""
    if not isinstance(scheme, dict):
        raise ValueError(f"{where}: expected a scheme (targets, weights, input_activations), got {scheme!r}; "
                         "preset names are not supported")
    fmt = scheme.get("format") or default_format
    if fmt != FORMAT:
        raise ValueError(f"{where}: format {fmt!r} is not supported; only {FORMAT!r} (int4 packed eight per int32)")
    w = scheme.get("weights")
    if not isinstance(w, dict):
        raise ValueError(f"{where}.weights: {w!r}, expected int4 weights")
    bits, kind = w.get("num_bits", 8), _lower(w, "type", "int")
    if bits != 4 or kind != "int":
        raise ValueError(f"{where}.weights: num_bits {bits}, type {kind!r}: only 4-bit integer weights are supported")
    if not w.get("symmetric", True):
        raise ValueError(f"{where}.weights: asymmetric int4 (symmetric: false, with zero points) is not supported; "
                         "the kernels compute w = q * scale")
    if _strategy(w) != "group":
        raise ValueError(f"{where}.weights: strategy {_strategy(w)!r} is not supported; only 'group' (one scale per "
                         "group_size input channels)")
    if _lower(w, "actorder", None) in (True, "group", "dynamic"):
        raise ValueError(f"{where}.weights: actorder {w['actorder']!r} (act-order, channels permuted by weight_g_idx) "
                         "is not supported; the kernels take each group's channels in order")
    group_size = w.get("group_size")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0 or group_size % 8:
        raise ValueError(f"{where}.weights: group_size {group_size!r} is not supported; it must be a positive multiple "
                         "of 8 (whole int32 words per group), and 128 for the CUDA path")
    return group_size


def _activation_scaling(where: str, args) -> str:
    """"per_token" or "per_tensor" for dynamic fp8 input activations; ValueError otherwise."""
    where = f"{where}.input_activations"
    if not isinstance(args, dict):
        raise ValueError(f"{where}: {args!r} (weight-only int4 with bf16 activations) is not supported; the kernels "
                         "take fp8 activations")
    bits, kind = args.get("num_bits", 8), _lower(args, "type", "int")
    if bits != 8 or kind != "float":
        raise ValueError(f"{where}: num_bits {bits}, type {kind!r}: only fp8 activations (num_bits 8, type float) "
                         "are supported")
    if not args.get("symmetric", True):
        raise ValueError(f"{where}: asymmetric activations (symmetric: false) are not supported")
    if args.get("dynamic", False) is not True:
        raise ValueError(f"{where}: dynamic {args.get('dynamic', False)!r}: static input scales are not supported for "
                         "compressed-tensors checkpoints; only dynamic: true")
    strategy = _strategy(args)
    if strategy not in ("token", "tensor"):
        raise ValueError(f"{where}: strategy {strategy!r} is not supported; only 'token' or 'tensor' dynamic scales")
    return f"per_{strategy}"


def _check_weight_shape(ckpt: Checkpoint, module: str, shape: tuple[int, int]) -> None:
    name = f"{module}.weight_shape"
    if name not in ckpt:
        raise KeyError(f"tensor {name} not found in {ckpt.path}")
    if ckpt.shape(name) != (2,) or not np.issubdtype(ckpt.dtype(name), np.integer):
        raise ValueError(f"{name}: expected an integer [2], got {ckpt.dtype(name)}{list(ckpt.shape(name))}")
    value = [int(v) for v in ckpt.tensor(name)]
    if value != list(shape):
        raise ValueError(f"{name}: {value}, where weight_packed and weight_scale hold [N, K] = {list(shape)}")
