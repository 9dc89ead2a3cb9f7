"""Every ```python block of README.md runs as pasted, in order, in one namespace (a block uses what
the blocks before it defined), on the CPU reference path ("auto" resolves to it without a GPU).

The checkpoint block reads `path` and `rank`: it runs on a tiny checkpoint in the real layout,
written first, under the names a reader would have bound, and the `layers` it defines is then
called as the text around it says. A block that needs a package the test extras do not install
is skipped with that reason, never silently."""

import importlib.util
import pathlib
import re

import jax.numpy as jnp
import numpy as np
import pytest

from test_checkpoint import write_checkpoint
from w4afp8_jax.checkpoint import Checkpoint

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(), re.S | re.M)
# The checkpoint block's shapes: load_moe_experts(..., tp_size=4) needs I / 4 a multiple of 128,
# and deepseek_topk's default 8 groups need E a multiple of 8.
CKPT_LAYERS, CKPT_E, CKPT_H, CKPT_I = (1, 2), 16, 256, 512
# What a block needs beyond the test extras: (text in the block, module, why).
OPTIONAL = [(".serialize()", "flatbuffers", "jax.export's serialize() needs the flatbuffers package")]


def check_layer_output(namespace):
    """The layer examples bind y, bf16 [B, H]."""
    y = np.asarray(namespace.pop("y"), np.float32)
    assert y.shape == (namespace["B"], namespace["H"]) and np.isfinite(y).all() and np.any(y != 0)


def call_checkpoint_layers(namespace, rng):
    """The checkpoint block defines layers(x, experts, gate_weights, biases) and reads the router
    with Checkpoint(path).tensor(name), as it says."""
    experts = namespace["experts"]
    assert experts.w13.packed.shape[:3] == (len(CKPT_LAYERS), CKPT_E, 2 * CKPT_I // 4)
    ckpt = Checkpoint(namespace["path"])
    gate = np.stack([ckpt.tensor(f"model.layers.{l}.mlp.gate.weight") for l in CKPT_LAYERS]).astype(np.float32)
    bias = np.stack([ckpt.tensor(f"model.layers.{l}.mlp.gate.e_score_correction_bias") for l in CKPT_LAYERS])
    x = jnp.asarray(rng.standard_normal((3, CKPT_H)), jnp.bfloat16)
    out = namespace["layers"](x, experts, jnp.asarray(gate), jnp.asarray(bias))
    assert out.shape == x.shape and out.dtype == jnp.bfloat16
    out = np.asarray(out, np.float32)
    assert np.isfinite(out).all() and not np.array_equal(out, np.asarray(x, np.float32))  # the layers added something


def test_readme_python_blocks_run_as_pasted(rng, tmp_path):
    assert len(BLOCKS) >= 3 and any("load_moe_experts(path" in b for b in BLOCKS)  # the extraction found them
    namespace = {"__name__": "__readme__"}
    for i, block in enumerate(BLOCKS):
        for text, module, why in OPTIONAL:
            if text in block and importlib.util.find_spec(module) is None:
                pytest.skip(f"README.md python block {i} (and any after it): {why} (pip install {module})")
        checkpoint = "load_moe_experts(path" in block
        if checkpoint:
            write_checkpoint(tmp_path / "ckpt", rng, layers=CKPT_LAYERS, experts=CKPT_E, hidden=CKPT_H, inter=CKPT_I)
            namespace.update(path=tmp_path / "ckpt", rank=1)
        exec(compile(block, f"README.md python block {i}", "exec"), namespace)
        if "y" in namespace:
            check_layer_output(namespace)
        if checkpoint:
            call_checkpoint_layers(namespace, rng)
