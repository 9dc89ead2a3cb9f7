"""Reading W4AFP8 DeepSeek-V3/R1 checkpoints: routed-expert weights and activation scales.

The layout (the published W4AFP8 DeepSeek-R1 model, made by TensorRT-LLM's mixed-precision MoE
quantization; SGLang loads it as `w4afp8`), per MoE layer L and routed expert e:

- `model.layers.{L}.mlp.experts.{e}.{gate,up,down}_proj.weight`: int8 [N, K/2], two signed int4
  per byte along K, element 2i in the low nibble (gate/up: [I, H/2]; down: [H, I/2]).
- `....{gate,up,down}_proj.weight_scale_inv`: f32 [N, K/128], a multiplier despite its name
  (w = int4 * scale).
- `model.layers.{L}.mlp.experts.{e}.{w1,w3,w2}.input_scale`: f32 [1] static activation scales
  (amax / 448) of the gate, up and down inputs, in the side file `act_scales.safetensors`; a
  layer's scale per GEMM is the max over all of its experts.
- `model.safetensors.index.json` maps every tensor name to its shard file;
  `hf_quant_config.json` says {"quantization": {"quant_algo": "MIXED_PRECISION"}}.

Files are memory-mapped: only the bytes of the requested layers, experts and tensor-parallel
slice are read.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec, Sharding, SingleDeviceSharding

from .weights import W4Weights, tile_packed

GROUP_SIZE = 128  # implied by the format: one scale per 128 input channels
INDEX_FILE = "model.safetensors.index.json"
ACT_SCALES_FILE = "act_scales.safetensors"
QUANT_CONFIG_FILE = "hf_quant_config.json"
QUANT_ALGO = "MIXED_PRECISION"
EXPERT_WEIGHT = "model.layers.{layer}.mlp.experts.{expert}.{proj}_proj.{tensor}"
INPUT_SCALE = "model.layers.{layer}.mlp.experts.{expert}.{gemm}.input_scale"
_EXPERT_RE = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight$")

# safetensors dtype names -> numpy dtypes (ml_dtypes for the ones numpy lacks).
_DTYPES = {
    "BOOL": np.bool_, "U8": np.uint8, "I8": np.int8, "U16": np.uint16, "I16": np.int16, "U32": np.uint32,
    "I32": np.int32, "U64": np.uint64, "I64": np.int64, "F16": np.float16, "F32": np.float32,
    "F64": np.float64, "BF16": ml_dtypes.bfloat16, "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2, "F8_E8M0": ml_dtypes.float8_e8m0fnu,
}


class SafetensorsFile:
    """One .safetensors file, memory-mapped; `tensor(name)` is a zero-copy numpy view.

    The format is a little-endian u64 header length, a JSON header {name: {"dtype", "shape",
    "data_offsets"}} and the raw bytes. safetensors' own numpy reader cannot return float8
    tensors (safetensors issue #682, open as of 0.8), which DeepSeek-V3's FP8 checkpoints are
    made of, so the header is read here and the bytes are mapped with numpy.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(header_len))
        header.pop("__metadata__", None)
        self.header = header
        self._data_start = 8 + header_len
        self._map = None

    def names(self) -> list[str]:
        return list(self.header)

    def dtype(self, name: str) -> np.dtype:
        kind = self.header[name]["dtype"]
        if kind not in _DTYPES:
            raise TypeError(f"{name} in {self.path}: unsupported safetensors dtype {kind}")
        return np.dtype(_DTYPES[kind])

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def tensor(self, name: str) -> np.ndarray:
        if self._map is None:
            self._map = np.memmap(self.path, np.uint8, "r")
        start, end = self.header[name]["data_offsets"]
        raw = self._map[self._data_start + start:self._data_start + end]
        return raw.view(self.dtype(name)).reshape(self.shape(name))


class Checkpoint:
    """A checkpoint directory: tensor name -> shard file (from the index, or from the headers of
    every .safetensors file when there is no index), files opened once."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"path: {self.path} is not a checkpoint directory")
        self._files: dict[str, SafetensorsFile] = {}
        index = self.path / INDEX_FILE
        if index.exists():
            self.weight_map = dict(json.loads(index.read_text())["weight_map"])
        else:
            self.weight_map = {}
            for file in sorted(self.path.glob("*.safetensors")):
                for name in self.file(file.name).names():
                    self.weight_map.setdefault(name, file.name)
        # The side file of activation scales may be missing from an older index.
        if (self.path / ACT_SCALES_FILE).exists():
            for name in self.file(ACT_SCALES_FILE).names():
                self.weight_map.setdefault(name, ACT_SCALES_FILE)

    def file(self, file_name: str) -> SafetensorsFile:
        if file_name not in self._files:
            if not (self.path / file_name).exists():
                raise FileNotFoundError(f"{file_name} (named in {INDEX_FILE}) is missing from {self.path}")
            self._files[file_name] = SafetensorsFile(self.path / file_name)
        return self._files[file_name]

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def _entry(self, name: str) -> tuple[SafetensorsFile, str]:
        if name not in self.weight_map:
            raise KeyError(f"tensor {name} not found in {self.path}")
        file = self.file(self.weight_map[name])
        if name not in file.header:
            raise KeyError(f"tensor {name} not found in {file.path} (where {INDEX_FILE} puts it)")
        return file, name

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name)[0].shape(name)

    def dtype(self, name: str) -> np.dtype:
        return self._entry(name)[0].dtype(name)

    def tensor(self, name: str) -> np.ndarray:
        file, name = self._entry(name)
        return file.tensor(name)

    def config(self) -> dict:
        path = self.path / "config.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def expert_layers(self) -> dict[int, int]:
        """{layer: number of routed experts} of every layer with routed-expert weights."""
        experts: dict[int, int] = {}
        for name in self.weight_map:
            match = _EXPERT_RE.match(name)
            if match:
                layer, expert = int(match[1]), int(match[2])
                experts[layer] = max(experts.get(layer, 0), expert + 1)
        return dict(sorted(experts.items()))


@dataclasses.dataclass(frozen=True)
class MoEExperts:
    """Routed-expert weights of several MoE layers, stacked along a leading layer axis.

    w13: W4Weights [L, E, 2I, H] (gate rows, then up rows); w2: W4Weights [L, E, H, I].
    a1_scale, a2_scale: f32 [L], the static fp8 scales of the GEMM1 and GEMM2 inputs (per layer,
        the max over all of the layer's experts of the checkpoint's w1/w3 and w2 input scales,
        as SGLang and vLLM take them: the same for every expert subset, tensor-parallel rank and
        sharding, so splitting a layer never changes its numbers), or None when the checkpoint
        has no activation scales (`moe` then computes dynamic scales).
    layers: static; the checkpoint's layer ids, in the order of the leading axis.

    A registered pytree: `jax.lax.scan(f, x, experts)` hands `f` one layer (w13 [E, 2I, H],
    scalar scales) at a time.
    """

    w13: W4Weights
    w2: W4Weights
    a1_scale: jax.Array | None
    a2_scale: jax.Array | None
    layers: tuple[int, ...] = dataclasses.field(default=(), metadata={"static": True})


jax.tree_util.register_dataclass(MoEExperts, data_fields=["w13", "w2", "a1_scale", "a2_scale"],
                                 meta_fields=["layers"])


def _int_list(name: str, values, low: int, high: int) -> list[int]:
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise TypeError(f"{name} must hold ints, got {v!r}")
        if not low <= v < high:
            raise ValueError(f"{name}: {int(v)} is outside [{low}, {high})")
        out.append(int(v))
    if not out:
        raise ValueError(f"{name} must not be empty")
    return out


def _expect(ckpt: Checkpoint, name: str, shape: tuple[int, ...], kind: str) -> None:
    """Checks a tensor's presence, dtype class and shape; errors name the tensor."""
    if name not in ckpt:
        raise KeyError(f"tensor {name} not found in {ckpt.path}")
    dtype, got = ckpt.dtype(name), ckpt.shape(name)
    if kind == "packed" and dtype not in (np.int8, np.uint8):
        raise TypeError(f"{name}: expected int8 packed int4 (two per byte), got {dtype}; an FP8 or bf16 "
                        "checkpoint must be converted first (python -m w4afp8_jax.convert SRC DST)")
    if kind == "float" and not jax.numpy.issubdtype(dtype, jax.numpy.floating):
        raise TypeError(f"{name}: expected floating-point scales, got {dtype}")
    if got != shape:
        raise ValueError(f"{name}: expected shape {list(shape)}, got {list(got)}")


def _resolve_sharding(sharding, name: str, shape: tuple[int, ...]) -> Sharding:
    if sharding is None:
        return SingleDeviceSharding(jax.devices()[0])
    if callable(sharding) and not isinstance(sharding, Sharding):
        out = sharding(name, shape)
        if not isinstance(out, Sharding):
            raise TypeError(f"sharding({name!r}, {shape}) must return a jax.sharding.Sharding, got {type(out).__name__}")
        return out
    if not isinstance(sharding, Sharding):
        raise TypeError(f"sharding must be None, a jax.sharding.Sharding or a callable (name, shape) -> Sharding, "
                        f"got {type(sharding).__name__}")
    if len(shape) == 1:  # the per-layer scales
        return replicated(sharding)
    return sharding


def replicated(sharding: Sharding) -> Sharding:
    """A sharding that replicates any array on the devices of `sharding`."""
    if isinstance(sharding, NamedSharding):
        return NamedSharding(sharding.mesh, PartitionSpec())
    if len(sharding.device_set) == 1:
        return sharding
    return NamedSharding(jax.sharding.Mesh(np.array(list(sharding.device_set)), ("devices",)), PartitionSpec())


def _place(name: str, shape: tuple[int, ...], sharding: Sharding, read: Callable, bar) -> jax.Array:
    """A global array from host blocks, each device's block read once (replicas share it)."""
    index_map = sharding.addressable_devices_indices_map(shape)
    blocks: dict[tuple, np.ndarray] = {}
    pieces = []
    for device, index in index_map.items():
        bounds = tuple(s.indices(n)[:2] for s, n in zip(index, shape))
        if bounds not in blocks:
            blocks[bounds] = read(bounds, bar)
        pieces.append(jax.device_put(blocks[bounds], device))
    return jax.make_array_from_single_device_arrays(shape, sharding, pieces)


def load_moe_experts(path: str | os.PathLike, *, layers: Iterable[int] | None = None, tp_size: int = 1,
                     tp_rank: int = 0, expert_ids: Sequence[int] | None = None,
                     sharding: Sharding | Callable[[str, tuple[int, ...]], Sharding] | None = None,
                     layout: str = "tiled", progress: bool | None = None) -> MoEExperts:
    """Loads the routed experts of a W4AFP8 checkpoint directory (layout in this module's doc).

    layers: checkpoint layer ids to load, in order; None loads every layer with routed-expert
        tensors (DeepSeek-V3: layers >= first_k_dense_replace = 3).
    tp_size, tp_rank: tensor parallelism over the intermediate dimension I: rank r of P gets
        gate/up rows [r I/P, (r+1) I/P) and the same range of down's input columns (K/2 bytes
        and K/128 scale columns). I/P must be a multiple of 128.
    expert_ids: the routed experts to load, in this order (expert parallelism); None loads all
        (config.json's n_routed_experts, or every expert the files hold).
    sharding: where the arrays go. None: jax.devices()[0]. A jax.sharding.Sharding: used for the
        [L, E, N, ...] weight arrays (e.g. NamedSharding(mesh, P(None, "ep")) shards experts);
        the [L] scales are replicated on its devices. A callable (name, shape) -> Sharding, with
        name one of "w13.packed", "w13.scales", "w2.packed", "w2.scales", "a1_scale",
        "a2_scale", chooses per array. Each device reads only its block from the files.
    layout: "tiled" (the byte order the CUDA kernels stream, as `W4Weights.prepare()`, done on
        the host while reading) or "checkpoint" (the bytes as stored). A tiled packed array
        cannot be split along its last axis and only at multiples of 16 rows.
    progress: a tqdm progress bar over the tensors read; None shows it when stderr is a
        terminal.

    Returns a MoEExperts (w13 [L, E, 2I/P, H], w2 [L, E, H, I/P], a1_scale and a2_scale f32 [L]
    or None). The activation scales are those of a full load whatever expert_ids, tp_size,
    tp_rank and sharding are: per layer, the max over every one of the layer's experts (loaded
    or not) of the w1/w3 input scales (a1_scale) and of the w2 input scales (a2_scale); a rank
    that took only its own experts' max would saturate inputs the one-device layer keeps. So a
    checkpoint with input scales needs them for every expert, also where its weight files hold
    only some experts.
    Raises KeyError naming a missing tensor (an input scale of any expert included, when the
    checkpoint holds some), ValueError / TypeError naming a tensor of the wrong shape or dtype,
    before reading any weight bytes.
    """
    ckpt = Checkpoint(path)
    quant_config = ckpt.path / QUANT_CONFIG_FILE
    if quant_config.exists():
        algo = json.loads(quant_config.read_text()).get("quantization", {}).get("quant_algo")
        if algo != QUANT_ALGO:
            raise ValueError(f"{quant_config}: quant_algo is {algo!r}, expected {QUANT_ALGO!r} (W4AFP8 routed experts)")
    if layout not in ("tiled", "checkpoint"):
        raise ValueError(f"layout must be 'tiled' or 'checkpoint', got {layout!r}")
    found = ckpt.expert_layers()
    if not found:
        raise KeyError(f"no routed-expert tensors ({EXPERT_WEIGHT.format(layer='L', expert='e', proj='gate', tensor='weight')}) "
                       f"in {ckpt.path}")
    layer_ids = list(found) if layers is None else _int_list("layers", layers, 0, sys.maxsize)
    num_experts = int(ckpt.config().get("n_routed_experts", max(found.values())))
    experts = list(range(num_experts)) if expert_ids is None else _int_list("expert_ids", expert_ids, 0, num_experts)
    for name, value in (("tp_size", tp_size), ("tp_rank", tp_rank)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{name} must be an int, got {value!r}")
    if tp_size < 1 or not 0 <= tp_rank < tp_size:
        raise ValueError(f"need tp_size >= 1 and 0 <= tp_rank < tp_size, got tp_size = {tp_size}, tp_rank = {tp_rank}")

    def key(layer, expert, proj, tensor="weight"):
        return EXPERT_WEIGHT.format(layer=layer, expert=expert, proj=proj, tensor=tensor)

    first = key(layer_ids[0], experts[0], "gate")
    if first not in ckpt:
        raise KeyError(f"tensor {first} not found in {ckpt.path}")
    inter, half_h = ckpt.shape(first)
    hidden = 2 * half_h
    if hidden % GROUP_SIZE or inter % GROUP_SIZE:
        raise ValueError(f"{first}: shape {[inter, half_h]} does not hold whole groups of {GROUP_SIZE} (H = {hidden}, "
                         f"I = {inter})")
    if inter % tp_size or (inter // tp_size) % GROUP_SIZE:
        raise ValueError(f"tp_size = {tp_size}: I = {inter} must split into slices that are multiples of {GROUP_SIZE}")
    local = inter // tp_size

    # Every tensor's presence, dtype and shape, from the headers only, before reading weights.
    shapes = {"gate": (inter, hidden), "up": (inter, hidden), "down": (hidden, inter)}
    for layer in layer_ids:
        for expert in experts:
            for proj, (n, k) in shapes.items():
                _expect(ckpt, key(layer, expert, proj), (n, k // 2), "packed")
                _expect(ckpt, key(layer, expert, proj, "weight_scale_inv"), (n, k // GROUP_SIZE), "float")
    a1, a2 = _activation_scales(ckpt, layer_ids, num_experts)

    if progress is None:
        progress = sys.stderr.isatty()
    from tqdm.auto import tqdm

    lo = tp_rank * local

    def read_w13(tensor):
        def read(bounds, bar):
            (l0, l1), (e0, e1), (n0, n1), (c0, c1) = bounds
            out = np.empty((l1 - l0, e1 - e0, n1 - n0, c1 - c0), np.uint8 if tensor == "weight" else np.float32)
            for i, layer in enumerate(layer_ids[l0:l1]):
                for j, expert in enumerate(experts[e0:e1]):
                    # rows [0, I/P) are the rank's gate rows, [I/P, 2I/P) its up rows
                    for proj, start in (("gate", 0), ("up", local)):
                        a, b = max(n0, start), min(n1, start + local)
                        if a < b:
                            src = ckpt.tensor(key(layer, expert, proj, tensor))
                            out[i, j, a - n0:b - n0] = _as_stored(src[lo + a - start:lo + b - start, c0:c1])
                            bar.update(1)
            return out
        return read

    def read_w2(tensor):
        per_byte = 2 if tensor == "weight" else GROUP_SIZE  # input channels per column

        def read(bounds, bar):
            (l0, l1), (e0, e1), (n0, n1), (c0, c1) = bounds
            start = lo // per_byte
            out = np.empty((l1 - l0, e1 - e0, n1 - n0, c1 - c0), np.uint8 if tensor == "weight" else np.float32)
            for i, layer in enumerate(layer_ids[l0:l1]):
                for j, expert in enumerate(experts[e0:e1]):
                    src = ckpt.tensor(key(layer, expert, "down", tensor))
                    out[i, j] = _as_stored(src[n0:n1, start + c0:start + c1])
                    bar.update(1)
            return out
        return read

    def tiled(read, full_cols):
        def read_tiled(bounds, bar):
            (n0, n1), (c0, c1) = bounds[2:]
            if (c0, c1) != (0, full_cols) or n0 % 16 or n1 % 16:
                raise ValueError(f"layout='tiled': a device block of a packed array must hold whole 16-row tiles and "
                                 f"every column, got rows [{n0}, {n1}) and columns [{c0}, {c1}) of {full_cols}; "
                                 "shard the layer, expert or row axis, or load with layout='checkpoint'")
            return tile_packed(read(bounds, bar))
        return read_tiled

    num_l, num_e = len(layer_ids), len(experts)
    plan = [
        ("w13.packed", (num_l, num_e, 2 * local, hidden // 2), read_w13("weight")),
        ("w13.scales", (num_l, num_e, 2 * local, hidden // GROUP_SIZE), read_w13("weight_scale_inv")),
        ("w2.packed", (num_l, num_e, hidden, local // 2), read_w2("weight")),
        ("w2.scales", (num_l, num_e, hidden, local // GROUP_SIZE), read_w2("weight_scale_inv")),
    ]
    if layout == "tiled":
        plan[0] = (*plan[0][:2], tiled(plan[0][2], hidden // 2))
        plan[2] = (*plan[2][:2], tiled(plan[2][2], local // 2))
    shardings = [_resolve_sharding(sharding, name, shape) for name, shape, _ in plan]
    total = 0
    for (name, shape, _), s in zip(plan, shardings):
        blocks = {tuple(sl.indices(n)[:2] for sl, n in zip(index, shape))
                  for index in s.addressable_devices_indices_map(shape).values()}
        per_pair = 2 if name.startswith("w13") else 1
        for b in blocks:
            total += (b[0][1] - b[0][0]) * (b[1][1] - b[1][0]) * per_pair
    with tqdm(total=total, desc="loading routed experts", unit="tensor", disable=not progress) as bar:
        arrays = [_place(name, shape, s, read, bar) for (name, shape, read), s in zip(plan, shardings)]

    def scales(name, values):
        if values is None:
            return None
        return jax.device_put(values, _resolve_sharding(sharding, name, values.shape))

    return MoEExperts(
        w13=W4Weights(arrays[0], arrays[1], GROUP_SIZE, layout),
        w2=W4Weights(arrays[2], arrays[3], GROUP_SIZE, layout),
        a1_scale=scales("a1_scale", a1), a2_scale=scales("a2_scale", a2), layers=tuple(layer_ids))


def _as_stored(block: np.ndarray) -> np.ndarray:
    """int8 packing as uint8 (same bits); scales widened to f32 (exact from bf16 / f16)."""
    if block.dtype == np.int8:
        return block.view(np.uint8)
    return block if block.dtype == np.uint8 else block.astype(np.float32)


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
