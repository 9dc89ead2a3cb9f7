"""Checks shared by the CPU-simulated and the GPU tests of the multi-GPU layers.

Tensor-parallel bound (moe_tensor_parallel's docstring): each device rounds its GEMM 2
partial sum c2_r to bf16 (unit roundoff u = 2^-8), the shares are added in f32 and rounded
once; `moe` rounds the whole c2 once and its combine once. Per element
    |tp - one| <= u * (rsf * sum_j |w_j| * (sum_r |c2_r| + |c2|) + |tp| + |one|) (1 + 1%).
`tensor_parallel_bound` computes the right side with the library's own ops (the c2_r from
the same fp8 h the layer computes), on the given implementation.

`PLACEMENT_CASES` / `check_every_placement`: the weight forms and placements `moe` takes,
run against either multi-device layer on the CPU devices.
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import w4afp8_jax as w4
from helpers import int4_weights, routed_tokens

U = 2.0**-8  # bf16 unit roundoff


def tensor_parallel_bound(x, ids, tw, w13, w2, size, *, got, want, routed_scaling_factor, implementation,
                          precision=None, a1_scale=None, a2_scale=None, activation_scaling="per_tensor") -> np.ndarray:
    """f32 [M, H]: the per-element bound above for TP over `size` devices (w13, w2: full weights).
    Per token, each device's h columns are the one-device layer's too (the row scales are the
    max over the devices), so the same bound holds."""
    a = _magnitudes(x, ids, tw, w13, w2, a1_scale, a2_scale, routed_scaling_factor, size=size,
                    implementation=implementation, precision=precision, per_token=activation_scaling == "per_token")
    return U * (np.asarray(a) + np.abs(got) + np.abs(want)) * 1.01


@functools.partial(jax.jit, static_argnames=("size", "implementation", "precision", "per_token"))
def _magnitudes(x, ids, tw, w13, w2, a1_scale, a2_scale, routed_scaling_factor, *, size, implementation, precision,
                per_token):
    """rsf * sum_j |w_j| * (sum_r |c2_r| + |c2|), f32 [M, H] (jitted once per signature: the CPU
    tests call it for every case)."""
    impl = dict(implementation=implementation)
    routing = w4.route(ids, w13.num_experts, **impl)
    q1, s1 = w4.gather_quantize(x, routing.positions, "per_token" if per_token else a1_scale, **impl)
    c1 = w4.grouped_gemm(q1, s1, w13, routing.group_offsets, precision=precision, **impl)
    q2, s2 = w4.silu_mul_quantize(c1, routing.group_offsets, "per_token" if per_token else a2_scale, **impl)
    c2 = w4.grouped_gemm(q2, s2, w2, routing.group_offsets, precision=precision, **impl)
    c2 = jnp.abs(c2.astype(jnp.float32))
    part = w2.in_features // size
    for r in range(size):
        w2_r = w4.tensor_parallel_slice(w13, w2, r, size)[1]
        c2_r = w4.grouped_gemm(q2[:, r * part:(r + 1) * part], s2, w2_r, routing.group_offsets,
                               precision=precision, **impl)
        c2 = c2 + jnp.abs(c2_r.astype(jnp.float32))
    pos = routing.positions
    kept = pos >= 0
    weights = jnp.where(kept, jnp.abs(tw.astype(jnp.float32)), 0.0)
    return routed_scaling_factor * jnp.einsum("mk,mkh->mh", weights, c2[jnp.where(kept, pos, 0)],
                                              precision=jax.lax.Precision.HIGHEST)


def relative_error(got, want) -> float:
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def assert_tensor_parallel_close(got, want, x, ids, tw, w13, w2, size, **kwargs):
    """The CPU tests' check of a tensor-parallel output (tests/test_tensor_parallel.py's docstring
    derives it): 99% of the elements within the per-element bound, and in norm the bound's norm
    plus 5e-3 relative. w13, w2: the full one-device weights; kwargs: tensor_parallel_bound's."""
    assert np.linalg.norm(want) > 0 and np.all(np.isfinite(got))
    bound = tensor_parallel_bound(x, ids, tw, w13, w2, size, got=got, want=want, **kwargs)
    err = np.abs(got - want)
    within = np.mean(err <= bound)
    assert within > 0.99, f"only {within:.4f} of the elements within the rounding bound"
    assert np.linalg.norm(err) <= np.linalg.norm(bound) + 5e-3 * np.linalg.norm(want), (
        f"relative error {relative_error(got, want):.2e}")


def assert_expert_parallel_close(got, want):
    """The CPU tests' check of an expert-parallel output (tests/test_expert_parallel.py's
    docstring derives it): 5e-3 relative norm, 90% of the elements bit-equal."""
    assert np.linalg.norm(want) > 0
    rel = relative_error(got, want)
    assert rel < 5e-3, f"relative error {rel:.2e}"
    assert np.mean(got == want) > 0.9


# ---------------------------------------------------------------------------------------------
# Every weight form and placement that `moe` takes, for both multi-device layers
# ---------------------------------------------------------------------------------------------
# Forms: one weight set in either layout; layer(1) of a two-layer stack (concrete index, traced
# under jit); every layer of the stack through layer(i) inside lax.scan (traced index).
FORMS = ("checkpoint", "tiled", "view", "scan_view")
# Placements: numpy on the host; uncommitted device arrays; committed to the first mesh device
# (load_moe_experts without sharding=) or to a device outside the mesh; sharded as the layer
# shards them; replicated over the mesh.
PLACEMENTS = ("host", "uncommitted", "device0", "other_device", "mesh", "replicated")
TOKEN_PLACEMENTS = ("host", "uncommitted", "device0", "mesh")  # x, topk_ids, topk_weights
SCALE_KINDS = ("float", "numpy", "device0", "dynamic")  # a1_scale, a2_scale
# Every form x placement; the first 16 cases also meet every (token placement, scale kind).
PLACEMENT_CASES = [
    pytest.param(form, placement, TOKEN_PLACEMENTS[n % 4], SCALE_KINDS[n // 4 % 4],
                 id=f"{form}-{placement}-tokens_{TOKEN_PLACEMENTS[n % 4]}-scales_{SCALE_KINDS[n // 4 % 4]}")
    for n, (form, placement) in enumerate(itertools.product(FORMS, PLACEMENTS))]
PLACEMENT_MESH = 2  # devices 0 and 1; "other_device" is the last CPU device
E_, H_, I_, M_, K_, LAYERS_ = 4, 128, 256, 8, 2, 2  # small: I/2 = 128 is one scale group
RSF = 2.5


@jax.jit
def _reference(x, ids, tw, w13, w2, a1_scale, a2_scale):
    """The one-device layer on the reference path, f32 (jitted once per signature)."""
    return w4.moe(x, ids, tw, w13, w2, a1_scale=a1_scale, a2_scale=a2_scale, routed_scaling_factor=RSF,
                  implementation="reference").astype(jnp.float32)


def place(tree, placement, mesh, spec_of):
    """tree's arrays placed as `placement` says; spec_of(array) -> its PartitionSpec for "mesh"."""
    if placement == "host":
        return jax.tree.map(np.asarray, tree)
    if placement == "uncommitted":
        return jax.tree.map(jnp.asarray, tree)
    if placement in ("device0", "other_device"):
        return jax.device_put(tree, jax.devices()[0 if placement == "device0" else -1])
    if placement == "replicated":
        return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))
    return jax.tree.map(lambda a: jax.device_put(a, NamedSharding(mesh, spec_of(a))), tree)


def activation_scales(kind):
    """(a1_scale, a2_scale) of one kind: Python floats, numpy scalars, device scalars committed
    to the first device, or None (dynamic)."""
    if kind == "dynamic":
        return None, None
    values = (0.02, 0.01)
    if kind == "float":
        return values
    if kind == "numpy":
        return tuple(np.float32(v) for v in values)
    return tuple(jax.device_put(jnp.float32(v), jax.devices()[0]) for v in values)


def off_mesh(tree, mesh) -> bool:
    """Whether some array of tree is committed to devices other than the mesh's."""
    devices = set(mesh.devices.flat)
    return any(isinstance(a, jax.Array) and a.committed and a.sharding.device_set != devices
               for a in jax.tree.leaves(tree))


def check_every_placement(rng, form, placement, tokens, scales, *, layer, axis_name, weight_axis, token_spec,
                          arrange, check):
    """One PLACEMENT_CASES case for one multi-device layer, eagerly and under jax.jit, against
    the one-device `moe` on the reference path (per layer of the stack).

    layer(x, ids, tw, w13, w2, mesh=, a1_scale=, a2_scale=, routed_scaling_factor=): the layer
    on the reference path; weight_axis: the weights' axis it shards, from the end (3: experts,
    2: rows); token_spec: its token PartitionSpec; arrange(w13, w2): its weight arrangement (of
    a set or a stack); check(got, want, x, ids, tw, w13, w2, **scales): its closeness check,
    w13 and w2 the one-device layer's weights, scales a1_scale, a2_scale and
    routed_scaling_factor. Under jit with an argument committed off the mesh, JAX refuses the
    call (the layers' docstrings): that error is checked, then the same arrays are closed over
    instead, which the layers move onto the mesh.
    """
    if len(jax.devices("cpu")) <= PLACEMENT_MESH:
        pytest.skip(f"needs {PLACEMENT_MESH + 1} CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count)")
    mesh = Mesh(np.array(jax.devices("cpu")[:PLACEMENT_MESH]), (axis_name,))
    layout = "checkpoint" if form == "checkpoint" else "tiled"
    sets = []
    for _ in range(LAYERS_):
        pair = (w4.W4Weights(*int4_weights(rng, E_, 2 * I_, H_)), w4.W4Weights(*int4_weights(rng, E_, H_, I_)))
        sets.append(tuple(w.prepare() for w in pair) if layout == "tiled" else pair)
    x, ids, tw = routed_tokens(rng, M_, H_, E_, K_)
    a1, a2 = activation_scales(scales)
    scale_args = dict(a1_scale=a1, a2_scale=a2, routed_scaling_factor=RSF)
    layers = {"checkpoint": [0], "tiled": [0], "view": [1], "scan_view": list(range(LAYERS_))}[form]
    if form in ("checkpoint", "tiled"):
        w13, w2 = arrange(*sets[0])
    else:
        stack = lambda ws: w4.W4Weights(np.stack([w.packed for w in ws]), np.stack([w.scales for w in ws]),
                                        ws[0].group_size, ws[0].layout)
        w13, w2 = arrange(stack([p[0] for p in sets]), stack([p[1] for p in sets]))
    wants = {i: np.asarray(_reference(x, ids, tw, *sets[i], a1, a2)) for i in layers}
    spec_of = lambda a: PartitionSpec(*[None] * (a.ndim - weight_axis), axis_name)
    w13, w2 = place((w13, w2), placement, mesh, spec_of)
    if form == "view":
        w13, w2 = w13.layer(1), w2.layer(1)
    args = (*place((x, ids, tw), tokens, mesh, lambda a: token_spec), w13, w2, a1, a2)

    def call(x, ids, tw, w13, w2, a1, a2):
        run = lambda a, b: layer(x, ids, tw, a, b, mesh=mesh, a1_scale=a1, a2_scale=a2, routed_scaling_factor=RSF)
        if form == "scan_view":
            return jax.lax.scan(lambda c, i: (c, run(w13.layer(i), w2.layer(i))), None, jnp.arange(LAYERS_))[1]
        return run(w13, w2)[None]

    outputs = {"eager": call(*args)}
    if off_mesh(args, mesh):
        with pytest.raises(ValueError, match="incompatible devices"):
            jax.jit(call)(*args)
        outputs["jit, closed over"] = jax.jit(lambda: call(*args))()
    else:
        outputs["jit"] = jax.jit(call)(*args)
    for mode, out in outputs.items():
        assert out.shape == (len(layers), M_, H_) and out.dtype == jnp.bfloat16, mode
        for got, i in zip(np.asarray(out.astype(jnp.float32)), layers):
            try:
                check(got, wants[i], x, ids, tw, *sets[i], **scale_args)
            except AssertionError as error:
                raise AssertionError(f"{mode}, layer {i}: {error}") from None
