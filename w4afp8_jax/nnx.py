"""A DeepSeek-V3 MoE block for Flax NNX (the optional extra: pip install "w4afp8_jax[flax]").

    from w4afp8_jax.nnx import DeepseekV3MoE

    moe_layers = DeepseekV3MoE.from_checkpoint(path)            # every MoE layer, stacked [L, ...]

    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def run(x, layer):                                           # one layer per step
        return x + layer(x)

    # or, reading each layer's int4 weights in place on every jax version (nnx.scan over the
    # stacked module is copy-free only from jaxlib 0.11.1, W4Weights.layer says why):
    @nnx.jit
    def run(moe_layers, x):
        return jax.lax.fori_loop(0, num_layers, lambda i, x: x + moe_layers(x, layer=i), x)

The block holds the router (gate weight [E, H] and e_score_correction_bias [E], f32), the routed
experts as W4Weights (int4, see `w4afp8_jax.moe`) with their static activation scales or
activation scaling, and optionally a bf16 shared expert. It is inference only: the int4 weights
are `W4Param` variables, not `nnx.Param`, so optimizers filtering on nnx.Param leave them alone.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
try:
    from flax import nnx
except ModuleNotFoundError as err:  # the optional extra
    raise ModuleNotFoundError(f"w4afp8_jax.nnx needs Flax: pip install \"w4afp8_jax[flax]\" ({err})",
                              name=err.name) from err
from jax.sharding import Sharding

from ._validate import check_activation_scaling
from .checkpoint import Checkpoint, compressed_tensors, load_moe_experts, replicated
from .convert import source_weight
from .moe import moe
from .ops.deepseek_topk import deepseek_topk
from .weights import W4Weights


class W4Param(nnx.Variable):
    """An inference-only variable: W4Weights or a static activation scale."""


class DeepseekV3MoE(nnx.Module):
    """DeepSeek-V3's MoE feed-forward block: out = moe(x) + shared_expert(x), bf16 [M, H].

    Router (DeepSeek-V3, `deepseek_topk`): logits = x @ gate_weight.T in f32, sigmoid scores,
    grouped top-k with e_score_correction_bias, weights renormalized; routed_scaling_factor is
    applied to the routed experts' sum (not to the shared expert).
    Shared expert: silu(x Wg^T) * (x Wu^T) @ Wd^T with bf16 weights, f32 accumulation.

    Arguments: gate_weight float [E, H]; e_score_correction_bias float [E] (None: zeros);
    w13 W4Weights [E, 2I, H] and w2 W4Weights [E, H, I]; a1_scale / a2_scale the static fp8
    scales (None: dynamic); activation_scaling "per_tensor" or "per_token" (dynamic per-token
    scales, with a1_scale = a2_scale = None), as in `moe`; shared_w13 bf16 [2Is, H] (gate rows
    then up rows) and shared_w2 bf16 [H, Is], or None for no shared expert; top_k, n_group,
    topk_group, routed_scaling_factor (config.json's num_experts_per_tok, n_group, topk_group,
    routed_scaling_factor); precision and implementation as in `moe`. An activation_scaling
    other than the two raises ValueError here; "per_token" with static scales, or on the CUDA
    path (the kernels take one scale per tensor so far), raises when the block is called.

    Under tensor parallelism (weights of one rank's slice of I) the output is that rank's
    partial sum: all-reduce it across the ranks.
    """

    def __init__(self, gate_weight, e_score_correction_bias, w13: W4Weights, w2: W4Weights, *, a1_scale=None,
                 a2_scale=None, activation_scaling: str = "per_tensor", shared_w13=None, shared_w2=None,
                 top_k: int = 8, n_group: int = 8, topk_group: int = 4, routed_scaling_factor: float = 2.5,
                 precision=None, implementation: str = "auto"):
        if (shared_w13 is None) != (shared_w2 is None):
            raise ValueError("shared_w13 and shared_w2 must be given together (or neither)")
        check_activation_scaling(activation_scaling, "reference")  # the CUDA path's refusal comes with the call
        self.gate_weight = nnx.Param(jnp.asarray(gate_weight, jnp.float32))
        bias = jnp.zeros(np.shape(gate_weight)[:-1], jnp.float32) if e_score_correction_bias is None else \
            jnp.asarray(e_score_correction_bias, jnp.float32)
        self.e_score_correction_bias = nnx.Param(bias)
        self.w13, self.w2 = W4Param(w13), W4Param(w2)
        self.a1_scale = None if a1_scale is None else W4Param(jnp.asarray(a1_scale, jnp.float32))
        self.a2_scale = None if a2_scale is None else W4Param(jnp.asarray(a2_scale, jnp.float32))
        self.shared_w13 = None if shared_w13 is None else nnx.Param(jnp.asarray(shared_w13, jnp.bfloat16))
        self.shared_w2 = None if shared_w2 is None else nnx.Param(jnp.asarray(shared_w2, jnp.bfloat16))
        self.activation_scaling = activation_scaling
        self.top_k, self.n_group, self.topk_group = top_k, n_group, topk_group
        self.routed_scaling_factor = float(routed_scaling_factor)
        self.precision, self.implementation = precision, implementation

    def __call__(self, x, layer=None) -> jax.Array:
        """x: float [M, H] -> bf16 [M, H].

        layer: for a stacked block (variables [L, ...]), the layer to run, an int32 scalar (a
        traced one is fine, e.g. a `lax.scan` or `fori_loop` counter): the kernels then read
        that layer's int4 weights in place (`W4Weights.layer`), where `nnx.scan` over the
        stacked block slices, and so copies, every layer's weights. None for a one-layer block
        (or inside nnx.scan / nnx.vmap).
        """
        def param(v):
            return None if v is None else (v[...] if layer is None else v[...][layer])

        w13, w2 = self.w13.get_value(), self.w2.get_value()
        if layer is None and np.ndim(w13.packed) == 4:
            raise ValueError(f"layer: this DeepseekV3MoE holds a stack of {np.shape(w13.packed)[0]} layers; pass "
                             "layer=i (or call it inside nnx.scan over the stack)")
        if layer is not None:
            w13, w2 = w13.layer(layer), w2.layer(layer)
        logits = jnp.dot(jnp.asarray(x, jnp.float32), param(self.gate_weight).T, precision=jax.lax.Precision.HIGHEST)
        topk_weights, topk_ids = deepseek_topk(logits, param(self.e_score_correction_bias), top_k=self.top_k,
                                               n_group=self.n_group, topk_group=self.topk_group)
        out = moe(x, topk_ids, topk_weights, w13, w2, a1_scale=param(self.a1_scale), a2_scale=param(self.a2_scale),
                  activation_scaling=self.activation_scaling, routed_scaling_factor=self.routed_scaling_factor,
                  precision=self.precision, implementation=self.implementation)
        if self.shared_w13 is None:
            return out
        xb = jnp.asarray(x, jnp.bfloat16)
        gate_up = jnp.dot(xb, param(self.shared_w13).T, preferred_element_type=jnp.float32)
        inter = gate_up.shape[-1] // 2
        h = (jax.nn.silu(gate_up[:, :inter]) * gate_up[:, inter:]).astype(jnp.bfloat16)
        shared = jnp.dot(h, param(self.shared_w2).T, preferred_element_type=jnp.float32)
        return (out.astype(jnp.float32) + shared).astype(jnp.bfloat16)

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, *, layers: int | Iterable[int] | None = None,
                        tp_size: int = 1, tp_rank: int = 0,
                        sharding: Sharding | Callable | None = None, shared_experts: bool = True,
                        progress: bool | None = None, **kwargs) -> "DeepseekV3MoE":
        """Blocks from a W4AFP8 or compressed-tensors checkpoint directory
        (`w4afp8_jax.load_moe_experts` reads the routed experts, with the activation scaling the
        checkpoint declares, `MoEExperts.activation_scaling`: the block applies it, so a
        compressed-tensors W4AFP8 checkpoint runs with per-token scales, on the reference path
        until the CUDA kernels have them; the router and shared-expert weights, bf16, FP8 with
        128 x 128 block scales, or compressed-tensors pack-quantized int4, are dequantized:
        router to f32, shared expert to bf16, rounded).

        layers: an int gives one block; a sequence, or None for every MoE layer, gives one
            module whose variables have a leading layer axis, for `nnx.scan` or `nnx.vmap`.
        tp_size, tp_rank: slice I of the routed and the shared experts (see the class doc).
        sharding: as in `load_moe_experts` for the routed experts; the router and the
            shared expert are replicated on the same devices (a callable is also asked for
            "gate_weight", "e_score_correction_bias", "shared_w13", "shared_w2").
        shared_experts: load the shared expert (bf16) when the checkpoint holds one; False
            builds blocks without it.
        progress: a progress bar while the routed experts load (None: for large loads), as in
            `load_moe_experts`.
        kwargs: override config.json's top_k (num_experts_per_tok), n_group, topk_group,
            routed_scaling_factor and the checkpoint's activation_scaling (e.g. "per_tensor" to
            run a per-token checkpoint on the CUDA path today), and set precision /
            implementation.

        Warns (UserWarning) where the checkpoint leaves something to a default: a config.json
        key of the above missing (DeepSeek-V3's value is used), no router bias
        (e_score_correction_bias: zeros), or no shared expert while shared_experts is True.
        """
        ckpt = Checkpoint(path)
        single = isinstance(layers, (int, np.integer))
        experts = load_moe_experts(path, layers=[int(layers)] if single else layers, tp_size=tp_size, tp_rank=tp_rank,
                                   sharding=sharding, progress=progress)
        config = ckpt.config()
        defaults = {"top_k": ("num_experts_per_tok", 8), "n_group": ("n_group", 8), "topk_group": ("topk_group", 4),
                    "routed_scaling_factor": ("routed_scaling_factor", 2.5)}  # DeepSeek-V3's
        options = {}
        for option, (key, default) in defaults.items():
            if option not in kwargs and key not in config:
                warnings.warn(f"{path}: config.json has no {key}; using DeepSeek-V3's {default}", stacklevel=2)
            options[option] = config.get(key, default)
        options["activation_scaling"] = experts.activation_scaling
        options.update(kwargs)

        def place(name, value):
            if sharding is None:
                return jnp.asarray(value)
            if callable(sharding) and not isinstance(sharding, Sharding):
                return jax.device_put(value, sharding(name, value.shape))
            return jax.device_put(value, replicated(sharding))

        def weight(name):  # float64 [N, K]
            module = name.removesuffix(".weight")
            if name not in ckpt and f"{module}.weight_packed" in ckpt:  # int4, compressed-tensors
                return compressed_tensors.dequantized_weight(ckpt, module)
            return source_weight(ckpt, name)

        def per_layer(name_of, convert):
            return np.stack([convert(weight(name_of(layer))) for layer in experts.layers])

        prefix = "model.layers.{}.mlp."
        gate = per_layer(lambda l: prefix.format(l) + "gate.weight", lambda w: w.astype(np.float32))
        bias_names = [prefix.format(l) + "gate.e_score_correction_bias" for l in experts.layers]
        if bias_names[0] in ckpt:
            bias = np.stack([np.asarray(ckpt.tensor(n), np.float32) for n in bias_names])
        else:
            warnings.warn(f"{path}: no {bias_names[0]}; the router bias is zero", stacklevel=2)
            bias = np.zeros(gate.shape[:2], np.float32)
        shared_w13 = shared_w2 = None
        shared_gate = prefix.format(experts.layers[0]) + "shared_experts.gate_proj.weight"
        has_shared = shared_gate in ckpt or shared_gate + "_packed" in ckpt
        if shared_experts and not has_shared:
            warnings.warn(f"{path}: no shared expert (model.layers.L.mlp.shared_experts.*); the blocks have none",
                          stacklevel=2)
        if shared_experts and has_shared:
            def shared(proj):
                return lambda l: prefix.format(l) + f"shared_experts.{proj}_proj.weight"
            s_inter = ckpt.shape(shared_gate if shared_gate in ckpt else shared_gate + "_packed")[0]
            if s_inter % tp_size:
                raise ValueError(f"tp_size = {tp_size} does not divide the shared expert's intermediate size {s_inter}")
            rows = slice(tp_rank * s_inter // tp_size, (tp_rank + 1) * s_inter // tp_size)
            to_bf16 = lambda w: w.astype(jnp.bfloat16)  # noqa: E731
            shared_w13 = np.concatenate([per_layer(shared("gate"), lambda w: to_bf16(w[rows])),
                                         per_layer(shared("up"), lambda w: to_bf16(w[rows]))], axis=1)
            shared_w2 = per_layer(shared("down"), lambda w: to_bf16(w[:, rows]))

        values = {"gate_weight": gate, "e_score_correction_bias": bias, "shared_w13": shared_w13,
                  "shared_w2": shared_w2}
        values = {k: None if v is None else place(k, v[0] if single else v) for k, v in values.items()}
        pick = (lambda a: None if a is None else a[0]) if single else (lambda a: a)
        w13, w2 = (jax.tree.map(pick, w) for w in (experts.w13, experts.w2))
        return cls(values["gate_weight"], values["e_score_correction_bias"], w13, w2,
                   a1_scale=pick(experts.a1_scale), a2_scale=pick(experts.a2_scale),
                   shared_w13=values["shared_w13"], shared_w2=values["shared_w2"], **options)
