"""safetensors checkpoint directories: the files, memory-mapped, and the index of tensor names.

Both expert formats (`w4afp8`, `compressed_tensors`) name a routed expert's projection
`EXPERT_MODULE` (DeepSeek-V3's, Qwen-MoE's naming) and its tensors `EXPERT_WEIGHT`.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import ml_dtypes
import numpy as np

INDEX_FILE = "model.safetensors.index.json"
ACT_SCALES_FILE = "act_scales.safetensors"  # the W4AFP8 format's side file of activation scales
EXPERT_MODULE = "model.layers.{layer}.mlp.experts.{expert}.{proj}_proj"
EXPERT_WEIGHT = EXPERT_MODULE + ".{tensor}"

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

    def expert_layers(self, tensor: str = "weight") -> dict[int, int]:
        """{layer: number of routed experts} of every layer with routed-expert tensors
        `EXPERT_WEIGHT` named `tensor` (the packed weights: "weight" in W4AFP8 checkpoints,
        "weight_packed" in compressed-tensors ones)."""
        pattern = re.compile(rf"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.{re.escape(tensor)}$")
        experts: dict[int, int] = {}
        for name in self.weight_map:
            match = pattern.match(name)
            if match:
                layer, expert = int(match[1]), int(match[2])
                experts[layer] = max(experts.get(layer, 0), expert + 1)
        return dict(sorted(experts.items()))
