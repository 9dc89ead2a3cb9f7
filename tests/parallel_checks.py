"""Checks shared by the CPU-simulated and the GPU tests of the multi-GPU layers.

Tensor-parallel bound (moe_tensor_parallel's docstring): each device rounds its GEMM 2
partial sum c2_r to bf16 (unit roundoff u = 2^-8), the shares are added in f32 and rounded
once; `moe` rounds the whole c2 once and its combine once. Per element
    |tp - one| <= u * (rsf * sum_j |w_j| * (sum_r |c2_r| + |c2|) + |tp| + |one|) (1 + 1%).
`tensor_parallel_bound` computes the right side with the library's own ops (the c2_r from
the same fp8 h the layer computes), on the given implementation.
"""

import jax
import jax.numpy as jnp
import numpy as np

import w4afp8_jax as w4

U = 2.0**-8  # bf16 unit roundoff


def tensor_parallel_bound(x, ids, tw, w13, w2, size, *, got, want, routed_scaling_factor, implementation,
                          precision=None, a1_scale=None, a2_scale=None) -> np.ndarray:
    """f32 [M, H]: the per-element bound above for TP over `size` devices (w13, w2: full weights)."""
    impl = dict(implementation=implementation)
    num_experts, inter = w13.num_experts, w2.in_features

    @jax.jit
    def magnitudes(x, ids, tw, w13, w2):
        routing = w4.route(ids, num_experts, **impl)
        q1, s1 = w4.gather_quantize(x, routing.positions, a1_scale, **impl)
        c1 = w4.grouped_gemm(q1, s1, w13, routing.group_offsets, precision=precision, **impl)
        q2, s2 = w4.silu_mul_quantize(c1, routing.group_offsets, a2_scale, **impl)
        c2 = w4.grouped_gemm(q2, s2, w2, routing.group_offsets, precision=precision, **impl)
        c2 = jnp.abs(c2.astype(jnp.float32))
        part = inter // size
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

    a = np.asarray(magnitudes(x, ids, tw, w13, w2))
    return U * (a + np.abs(got) + np.abs(want)) * 1.01


def relative_error(got, want) -> float:
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))
