"""Every bad input is rejected before any computation, with an error naming the argument."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import w4afp8_jax as w4

E, H, I, M, K = 4, 256, 128, 3, 2
# 1e-39 and 2**-127 are subnormal in f32 (below the smallest normal 2**-126); 1e-50 is 0 there.
BAD_SCALES = [0.0, -1.0, float("nan"), float("inf"), -float("inf"), 1e-39, 2.0**-127, 1e-50, 1e39, [1.0, 2.0],
              np.ones((2, 2)), "0.5", True]


@pytest.fixture
def problem(rng):
    x = jnp.asarray(rng.standard_normal((M, H)), jnp.bfloat16)
    ids = jnp.asarray(rng.integers(0, E, size=(M, K)), jnp.int32)
    weights = jnp.asarray(rng.random((M, K)), jnp.float32)
    w13 = w4.W4Weights(jnp.asarray(rng.integers(0, 256, (E, 2 * I, H // 2), dtype=np.uint8)),
                       jnp.asarray(rng.standard_normal((E, 2 * I, H // 128)) * 0.005, jnp.float32))
    w2 = w4.W4Weights(jnp.asarray(rng.integers(0, 256, (E, H, I // 2), dtype=np.uint8)),
                      jnp.asarray(rng.standard_normal((E, H, I // 128)) * 0.005, jnp.float32))
    return dict(x=x, topk_ids=ids, topk_weights=weights, w13=w13, w2=w2)


def weights(rng, e, n, k, gs=128):
    return w4.W4Weights(jnp.asarray(rng.integers(0, 256, (e, n, k // 2), dtype=np.uint8)),
                        jnp.asarray(rng.standard_normal((e, n, k // gs)), jnp.float32), gs)


def call_moe(p, **kw):
    args = {**p, **kw}
    extra = {k: args.pop(k) for k in list(args) if k not in ("x", "topk_ids", "topk_weights", "w13", "w2")}
    return w4.moe(args["x"], args["topk_ids"], args["topk_weights"], args["w13"], args["w2"],
                  implementation=extra.pop("implementation", "reference"), **extra)


def test_valid_problem_runs(problem):
    out = call_moe(problem)  # the baseline the bad cases below perturb
    assert out.shape == (M, H) and out.dtype == jnp.bfloat16


# ------------------------------------------------------------------------------------------
# moe
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,bad,exc", [
    ("x", lambda p, r: p["x"][0], ValueError),                                     # rank 1
    ("x", lambda p, r: p["x"][None], ValueError),                                  # rank 3
    ("x", lambda p, r: jnp.ones((M, H), jnp.int32), TypeError),                    # not floating
    ("x", lambda p, r: jnp.ones((M, H), bool), TypeError),
    ("topk_ids", lambda p, r: p["topk_ids"].astype(jnp.float32), TypeError),       # not integer
    ("topk_ids", lambda p, r: p["topk_ids"][0], ValueError),                       # rank 1
    ("topk_ids", lambda p, r: p["topk_ids"][:2], ValueError),                      # rows != M
    ("topk_weights", lambda p, r: p["topk_weights"].astype(jnp.int32), TypeError),
    ("topk_weights", lambda p, r: p["topk_weights"][0], ValueError),
    ("topk_weights", lambda p, r: p["topk_weights"][:, :1], ValueError),           # shape != topk_ids
    ("w13", lambda p, r: p["w13"].dequantize(), TypeError),                        # not a W4Weights
    ("w2", lambda p, r: (p["w2"].packed, p["w2"].scales), TypeError),
])
def test_moe_bad_arrays(rng, problem, name, bad, exc):
    with pytest.raises(exc, match=name):
        call_moe(problem, **{name: bad(problem, rng)})


def test_moe_mismatched_shapes(rng, problem):
    with pytest.raises(ValueError, match="w2"):  # E differs
        call_moe(problem, w2=weights(rng, E + 1, H, I))
    with pytest.raises(ValueError, match="w13"):  # H of x differs from w13's K
        call_moe(problem, x=jnp.ones((M, H + 128), jnp.bfloat16))
    with pytest.raises(ValueError, match="w13"):  # odd number of w13 rows (gate + up)
        call_moe(problem, w13=weights(rng, E, 2 * I + 1, H))
    with pytest.raises(ValueError, match="w2"):  # I of w2 differs from w13's
        call_moe(problem, w2=weights(rng, E, H, 2 * I))
    with pytest.raises(ValueError, match="w2"):  # w2 output features differ from H
        call_moe(problem, w2=weights(rng, E, H + 16, I))
    with pytest.raises(ValueError, match="w13 and w2 look swapped"):
        call_moe(problem, w13=problem["w2"], w2=problem["w13"])
    with pytest.raises(ValueError, match=r"x has H = 384$"):  # a plain mismatch gets no such hint
        call_moe(problem, x=jnp.ones((M, H + 128), jnp.bfloat16))


@pytest.mark.parametrize("arg", ["a1_scale", "a2_scale"])
@pytest.mark.parametrize("value", BAD_SCALES)
def test_moe_bad_static_scales(problem, arg, value):
    with pytest.raises((ValueError, TypeError), match=arg):
        call_moe(problem, **{arg: value})


@pytest.mark.parametrize("value", [1e-39, 2.0**-127, np.float32(1e-40), jnp.float32(5e-39)])
def test_subnormal_scales_rejected_with_the_rule(rng, problem, value):
    # Below the smallest normal f32 a scale would be flushed to zero by XLA on the CPU.
    r = w4.route(problem["topk_ids"], E, implementation="reference")
    c1 = jnp.asarray(rng.standard_normal((M * K, 2 * I)), jnp.bfloat16)
    lhs = jnp.asarray(rng.standard_normal((M * K, H)), jnp.float8_e4m3fn)
    calls = {
        "a1_scale": lambda v: call_moe(problem, a1_scale=v),
        "a2_scale": lambda v: call_moe(problem, a2_scale=v),
        "scale": lambda v: w4.quantize_fp8(problem["x"], v),
        "lhs_scale": lambda v: w4.grouped_gemm(lhs, v, problem["w13"], r.group_offsets, implementation="reference"),
    }
    calls["gather_quantize scale"] = lambda v: w4.gather_quantize(problem["x"], r.positions, v, implementation="reference")
    calls["silu_mul_quantize scale"] = lambda v: w4.silu_mul_quantize(c1, r.group_offsets, v, implementation="reference")
    for what, call in calls.items():
        arg = what.split()[-1]
        with pytest.raises(ValueError, match=rf"^{arg} must be at least the smallest normal float32 .*2\*\*-126"):
            call(value)


def test_smallest_normal_scale_is_accepted(problem):
    tiny = float(np.finfo(np.float32).tiny)
    x = jnp.asarray([[0.0, 0.0, 1e-37, -1e-37, 1.0, np.inf]], jnp.float32)
    q, s = w4.quantize_fp8(x, tiny)
    assert float(s) == tiny
    # The IEEE answers: 0 / tiny = 0, +-1e-37 / tiny = +-8.507 -> +-9 (nearest e4m3), 1 / tiny and inf saturate.
    np.testing.assert_array_equal(np.asarray(q.astype(jnp.float32)),
                                  np.clip(np.float32([[0, 0, 1e-37, -1e-37, 1, np.inf]]) / np.float32(tiny), -448, 448)
                                  .astype(jnp.float8_e4m3fn).astype(np.float32))
    out = call_moe(problem, a1_scale=tiny, a2_scale=tiny)
    assert np.all(np.isfinite(np.asarray(out.astype(jnp.float32))))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), "abc", "2", True, None, [1.0, 2.0]])
def test_moe_bad_routed_scaling_factor(problem, value):
    with pytest.raises((ValueError, TypeError), match="routed_scaling_factor"):
        call_moe(problem, routed_scaling_factor=value)


# ------------------------------------------------------------------------------------------
# implementation
# ------------------------------------------------------------------------------------------
def step_calls(p):
    r = w4.route(p["topk_ids"], E, implementation="reference")
    q1, s1 = w4.gather_quantize(p["x"], r.positions, implementation="reference")
    c1 = w4.grouped_gemm(q1, s1, p["w13"], r.group_offsets, implementation="reference")
    rows = jnp.ones((M * K, H), jnp.bfloat16)
    return {
        "route": lambda impl: w4.route(p["topk_ids"], E, implementation=impl),
        "gather_quantize": lambda impl: w4.gather_quantize(p["x"], r.positions, implementation=impl),
        "grouped_gemm": lambda impl: w4.grouped_gemm(q1, s1, p["w13"], r.group_offsets, implementation=impl),
        "silu_mul_quantize": lambda impl: w4.silu_mul_quantize(c1, r.group_offsets, implementation=impl),
        "combine": lambda impl: w4.combine(rows, r.positions, p["topk_weights"], 2.5, implementation=impl),
        "moe": lambda impl: call_moe(p, implementation=impl),
    }


@pytest.mark.parametrize("op", ["route", "gather_quantize", "grouped_gemm", "silu_mul_quantize", "combine", "moe"])
def test_implementation_names(problem, op):
    call = step_calls(problem)[op]
    for bad in ("gpu", "CUDA", "", None, "triton"):
        with pytest.raises(ValueError, match="implementation"):
            call(bad)
    assert call("auto") is not None and call("reference") is not None


@pytest.mark.skipif(w4.cuda_unavailable_reason() is None, reason="the CUDA path is available here")
@pytest.mark.parametrize("op", ["route", "gather_quantize", "grouped_gemm", "silu_mul_quantize", "combine", "moe"])
def test_cuda_unavailable_says_why(problem, op):
    reason = w4.cuda_unavailable_reason()
    assert isinstance(reason, str) and reason
    with pytest.raises(RuntimeError, match='implementation="cuda" is not available') as info:
        step_calls(problem)[op]("cuda")
    assert reason in str(info.value)


# ------------------------------------------------------------------------------------------
# route
# ------------------------------------------------------------------------------------------
def test_route_bad_inputs(rng):
    ids = jnp.asarray(rng.integers(0, 8, size=(5, 2)), jnp.int32)
    with pytest.raises(TypeError, match="topk_ids"):
        w4.route(ids.astype(jnp.float32), 8)
    with pytest.raises(ValueError, match="topk_ids"):
        w4.route(ids[0], 8)
    with pytest.raises(ValueError, match="topk_ids"):
        w4.route(ids[:, :, None], 8)
    for n in (0, -1, 1025, 10**6):
        with pytest.raises(ValueError, match="num_experts"):
            w4.route(ids, n)
    for n in (8.0, True, "8", None, np.float32(8)):
        with pytest.raises(TypeError, match="num_experts"):
            w4.route(ids, n)
    # the bounds themselves are fine
    assert w4.route(ids, 1, implementation="reference").group_offsets.shape == (2,)
    assert w4.route(ids, 1024, implementation="reference").group_offsets.shape == (1025,)


# ------------------------------------------------------------------------------------------
# quantize_fp8 / gather_quantize / silu_mul_quantize / combine
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", BAD_SCALES)
def test_quantize_fp8_bad_scale(rng, value):
    x = jnp.asarray(rng.standard_normal((4, 8)), jnp.float32)
    with pytest.raises((ValueError, TypeError), match="scale"):
        w4.quantize_fp8(x, value)


def test_quantize_fp8_bad_x(rng):
    with pytest.raises(TypeError, match="x"):
        w4.quantize_fp8(jnp.asarray(rng.integers(-5, 5, size=(4, 8)), jnp.int32))


def test_gather_quantize_bad_inputs(rng, problem):
    r = w4.route(problem["topk_ids"], E, implementation="reference")
    x, pos = problem["x"], r.positions
    for bad, exc in ((x[0], ValueError), (x.astype(jnp.int32), TypeError)):
        with pytest.raises(exc, match="x"):
            w4.gather_quantize(bad, pos, implementation="reference")
    for bad, exc in ((pos.astype(jnp.float32), TypeError), (pos[0], ValueError), (pos[:1], ValueError)):
        with pytest.raises(exc, match="positions"):
            w4.gather_quantize(x, bad, implementation="reference")
    for value in BAD_SCALES:
        with pytest.raises((ValueError, TypeError), match="scale"):
            w4.gather_quantize(x, pos, value, implementation="reference")


def test_silu_mul_quantize_bad_inputs(rng):
    c1 = jnp.asarray(rng.standard_normal((6, 8)), jnp.bfloat16)
    off = jnp.asarray([0, 2, 5], jnp.int32)
    for bad, exc in ((c1.astype(jnp.float32), TypeError), (c1[0], ValueError), (c1[:, :7], ValueError)):
        with pytest.raises(exc, match="c1"):
            w4.silu_mul_quantize(bad, off, implementation="reference")
    for bad, exc in ((off.astype(jnp.float32), TypeError), (off[None], ValueError)):
        with pytest.raises(exc, match="group_offsets"):
            w4.silu_mul_quantize(c1, bad, implementation="reference")
    for value in BAD_SCALES:
        with pytest.raises((ValueError, TypeError), match="scale"):
            w4.silu_mul_quantize(c1, off, value, implementation="reference")


def test_combine_bad_inputs(rng, problem):
    r = w4.route(problem["topk_ids"], E, implementation="reference")
    pos, tw = r.positions, problem["topk_weights"]
    rows = jnp.asarray(rng.standard_normal((M * K, H)), jnp.bfloat16)
    for bad, exc in ((rows.astype(jnp.float32), TypeError), (rows[0], ValueError)):
        with pytest.raises(exc, match="rows"):
            w4.combine(bad, pos, tw, implementation="reference")
    # Any row count is valid (expert parallelism combines from a larger buffer): positions
    # outside [0, R) are dropped slots, never read.
    short = w4.combine(rows[:-1], pos, tw, implementation="reference")
    last = np.asarray(pos) == M * K - 1
    without_last = w4.combine(rows, jnp.where(last, -1, pos), tw, implementation="reference")
    np.testing.assert_array_equal(np.asarray(short, np.float32), np.asarray(without_last, np.float32))
    for bad, exc in ((tw.astype(jnp.int32), TypeError), (tw[0], ValueError), (tw[:, :1], ValueError)):
        with pytest.raises(exc, match="topk_weights"):
            w4.combine(rows, pos, bad, implementation="reference")
    for bad, exc in ((pos.astype(jnp.float32), TypeError), (pos[0], ValueError)):
        with pytest.raises(exc, match="positions"):
            w4.combine(rows, bad, tw, implementation="reference")
    for value in (float("nan"), float("inf"), "x"):
        with pytest.raises((ValueError, TypeError), match="routed_scaling_factor"):
            w4.combine(rows, pos, tw, value, implementation="reference")


# ------------------------------------------------------------------------------------------
# grouped_gemm
# ------------------------------------------------------------------------------------------
def test_grouped_gemm_bad_inputs(rng):
    w = weights(rng, E, 16, 256)
    lhs = jnp.asarray(rng.standard_normal((10, 256)), jnp.float8_e4m3fn)
    off = jnp.asarray([0, 3, 3, 7, 9], jnp.int32)
    for bad, exc in ((lhs[0], ValueError), (lhs[None], ValueError), (lhs.astype(jnp.bfloat16), TypeError),
                     (lhs.astype(jnp.float8_e5m2), TypeError), (lhs[:, :128], ValueError)):
        with pytest.raises(exc, match="lhs"):
            w4.grouped_gemm(bad, 0.1, w, off, implementation="reference")
    for bad in (w.dequantize(), (w.packed, w.scales), None):
        with pytest.raises(TypeError, match="rhs"):
            w4.grouped_gemm(lhs, 0.1, bad, off, implementation="reference")
    for bad, exc in ((off.astype(jnp.float32), TypeError), (off[None], ValueError), (off[:-1], ValueError),
                     (jnp.concatenate([off, off[-1:]]), ValueError)):
        with pytest.raises(exc, match="group_offsets"):
            w4.grouped_gemm(lhs, 0.1, w, bad, implementation="reference")
    for value in [None] + BAD_SCALES:
        with pytest.raises((ValueError, TypeError), match="lhs_scale"):
            w4.grouped_gemm(lhs, value, w, off, implementation="reference")


def kernel_layout_problem(rng, gs, inter):
    """A valid layer for the reference path with group size `gs` and I = `inter` (N of w13 = 2I)."""
    q = lambda n, k: w4.quantize_weights(rng.standard_normal((E, n, k)).astype(np.float32), gs)  # noqa: E731
    x = jnp.asarray(rng.standard_normal((M, H)), jnp.bfloat16)
    ids = jnp.asarray(rng.integers(0, E, size=(M, K)), jnp.int32)
    return dict(x=x, topk_ids=ids, topk_weights=jnp.asarray(rng.random((M, K)), jnp.float32), w13=q(2 * inter, H),
                w2=q(H, inter))


def test_kernel_layout_is_checked_per_argument(rng):
    """The CUDA kernels need group size 128 and N % 16 == 0; the reference path takes any layout.
    The check runs on the CPU too (it only reads sizes) and names the argument the caller passed."""
    from w4afp8_jax.moe import check_moe_args
    from w4afp8_jax.ops.grouped_gemm import check_kernel_layout

    good, bad = kernel_layout_problem(rng, 128, 128), kernel_layout_problem(rng, 64, 128)
    layer = lambda p: (p["x"], p["topk_ids"], p["topk_weights"], p["w13"], p["w2"])  # noqa: E731
    for p in (good, bad):
        assert call_moe(p).shape == (M, H)  # the reference path runs both
        check_moe_args(*layer(p), "reference")
    check_moe_args(*layer(good), "cuda")
    with pytest.raises(ValueError, match=r"w13\.group_size must be 128 on the CUDA path, got 64"):
        check_moe_args(*layer(bad), "cuda")
    with pytest.raises(ValueError, match=r"w2\.group_size must be 128 on the CUDA path, got 64"):
        check_moe_args(*layer({**bad, "w13": good["w13"]}), "cuda")
    # With group size 128 a layer's N (2I, H) are multiples of 128; a lone GEMM's need not be.
    narrow = weights(rng, E, 24, 256)
    check_kernel_layout("rhs", narrow, "reference")
    with pytest.raises(ValueError, match="rhs: N = 24 output features must be a multiple of 16"):
        check_kernel_layout("rhs", narrow, "cuda")


def test_kernel_layout_errors_name_the_argument(rng, monkeypatch):
    """moe, grouped_gemm and the multi-GPU layers with the CUDA path chosen reject group size 64
    before anything runs, naming the argument the caller passed (w13, w2, rhs). The check comes
    before any kernel, so it is tested here with the CUDA path's choice forced on any machine."""
    from w4afp8_jax import _backend

    monkeypatch.setattr(_backend, "resolve", lambda implementation: "cuda")
    p, good = kernel_layout_problem(rng, 64, 128), kernel_layout_problem(rng, 128, 128)
    with pytest.raises(ValueError, match=r"w13\.group_size must be 128 on the CUDA path, got 64"):
        call_moe(p, implementation="cuda")
    with pytest.raises(ValueError, match=r"w2\.group_size must be 128"):
        call_moe({**p, "w13": good["w13"]}, implementation="cuda")
    lhs = jnp.zeros((4, H), jnp.float8_e4m3fn)
    with pytest.raises(ValueError, match=r"rhs\.group_size must be 128"):
        w4.grouped_gemm(lhs, 1.0, p["w13"], jnp.asarray([0, 1, 2, 3, 4], jnp.int32), implementation="cuda")
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("ep",))
    layer = (p["x"], p["topk_ids"], p["topk_weights"], p["w13"], p["w2"])
    with pytest.raises(ValueError, match=r"w13\.group_size must be 128"):
        w4.moe_expert_parallel(*layer, mesh=mesh, axis_name="ep", implementation="cuda")
    with pytest.raises(ValueError, match=r"w13\.group_size must be 128"):
        w4.moe_tensor_parallel(*layer, mesh=mesh, axis_name="ep", implementation="cuda")


# ------------------------------------------------------------------------------------------
# Per-token and per-row scales
# ------------------------------------------------------------------------------------------
def per_token_calls(rng, p):
    """Every public entry point asked for per-token or per-row scales, by argument name."""
    r = w4.route(p["topk_ids"], E, implementation="reference")
    lhs = jnp.asarray(rng.standard_normal((M * K, H)), jnp.float8_e4m3fn)
    c1 = jnp.asarray(rng.standard_normal((M * K, 2 * I)), jnp.bfloat16)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("ep",))
    layer = (p["x"], p["topk_ids"], p["topk_weights"], p["w13"], p["w2"])
    sizes = jnp.asarray([M * K, 0, 0, 0], jnp.int32)
    return {
        "moe activation_scaling": lambda impl: call_moe(p, activation_scaling="per_token", implementation=impl),
        "moe_expert_parallel activation_scaling": lambda impl: w4.moe_expert_parallel(
            *layer, mesh=mesh, activation_scaling="per_token", implementation=impl),
        "moe_tensor_parallel activation_scaling": lambda impl: w4.moe_tensor_parallel(
            *layer, mesh=mesh, axis_name="ep", activation_scaling="per_token", implementation=impl),
        "gather_quantize scale": lambda impl: w4.gather_quantize(p["x"], r.positions, "per_token", implementation=impl),
        "silu_mul_quantize scale": lambda impl: w4.silu_mul_quantize(c1, r.group_offsets, "per_token",
                                                                     implementation=impl),
        "grouped_gemm lhs_scale": lambda impl: w4.grouped_gemm(lhs, jnp.full(M * K, 0.1), p["w13"], r.group_offsets,
                                                               implementation=impl),
        "ragged_dot lhs_scale": lambda impl: w4.ragged_dot(lhs, p["w13"], sizes, lhs_scale=np.full(M * K, 0.1),
                                                           implementation=impl),
        "ragged_dot(float) lhs_scale": lambda impl: w4.ragged_dot(lhs.astype(jnp.float32), p["w13"], sizes,
                                                                  lhs_scale="per_token", implementation=impl),
    }


def test_per_token_runs_on_the_reference_path(rng, problem):
    """The baseline of the next test: every call is valid on the reference path."""
    for what, call in per_token_calls(rng, problem).items():
        assert jax.tree.leaves(call("reference")), what


def test_per_token_is_refused_on_the_cuda_path(rng, problem, monkeypatch):
    """The CUDA kernels take one scale per tensor so far: per-token and per-row scales raise a
    ValueError naming the argument before anything runs (tested with the CUDA path's choice
    forced, on any machine: a kernel reached here would fail differently)."""
    from w4afp8_jax import _backend

    calls = per_token_calls(rng, problem)
    monkeypatch.setattr(_backend, "resolve", lambda implementation: "cuda")
    for what, call in calls.items():
        arg = what.split()[-1]
        with pytest.raises(ValueError, match=rf"^{arg}: per-\w+ (activation )?scales .* are not supported by the CUDA "
                                             r"kernels yet .*implementation='reference' computes them"):
            call("cuda")


@pytest.mark.parametrize("value", ["per_row", "PER_TOKEN", "", None, 1, ["per_token"]])
def test_bad_activation_scaling_is_named(problem, value):
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("ep",))
    layer = (problem["x"], problem["topk_ids"], problem["topk_weights"], problem["w13"], problem["w2"])
    for call in (lambda: call_moe(problem, activation_scaling=value),
                 lambda: w4.moe_expert_parallel(*layer, mesh=mesh, activation_scaling=value,
                                                implementation="reference"),
                 lambda: w4.moe_tensor_parallel(*layer, mesh=mesh, axis_name="ep", activation_scaling=value,
                                                implementation="reference")):
        with pytest.raises(ValueError, match=r"^activation_scaling must be one of \('per_tensor', 'per_token'\)"):
            call()


@pytest.mark.parametrize("arg", ["a1_scale", "a2_scale"])
def test_per_token_takes_no_static_scales(problem, arg):
    """Per-token scales are dynamic; static scales are per tensor: both at once is refused."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("ep",))
    layer = (problem["x"], problem["topk_ids"], problem["topk_weights"], problem["w13"], problem["w2"])
    kw = {arg: 0.02, "activation_scaling": "per_token"}
    for call in (lambda: call_moe(problem, **kw),
                 lambda: w4.moe_expert_parallel(*layer, mesh=mesh, implementation="reference", **kw),
                 lambda: w4.moe_tensor_parallel(*layer, mesh=mesh, axis_name="ep", implementation="reference", **kw)):
        with pytest.raises(ValueError, match=rf"^{arg} must be None with activation_scaling='per_token'"):
            call()


def test_bad_per_row_lhs_scales(rng, problem):
    """grouped_gemm's lhs_scale [R]: one per row of lhs, each finite and >= 2**-126 (the scalar
    rule), checked on its device when concrete; a traced one is not inspected."""
    w = weights(rng, E, 16, 256)
    lhs = jnp.asarray(rng.standard_normal((10, 256)), jnp.float8_e4m3fn)
    off = jnp.asarray([0, 3, 3, 7, 9], jnp.int32)
    good = np.full(10, 0.1, np.float32)
    gemm = lambda s: w4.grouped_gemm(lhs, s, w, off, implementation="reference")  # noqa: E731
    for bad in (good[:9], np.ones((10, 1)), np.ones((2, 5)), jnp.ones(11)):
        with pytest.raises(ValueError, match=r"^lhs_scale must be a scalar or hold one scale per row of lhs, "
                                             r"shape \(10,\)"):
            gemm(bad)
    for value in (0.0, -1.0, np.nan, np.inf, 1e-39, 1e39):
        bad = good.astype(np.float64)
        bad[7] = value
        with np.errstate(over="ignore", under="ignore"):
            on_device = jnp.asarray(bad.astype(np.float32))
        for scales in (bad, on_device):  # float64 on the host: checked as the f32 it becomes
            with pytest.raises(ValueError, match=r"^lhs_scale\[7\] is .*: row scales must be finite and at least the "
                                                 r"smallest normal float32"):
                gemm(scales)
    with pytest.raises(TypeError, match="^lhs_scale must hold real numbers, got dtype bool"):
        gemm(np.ones(10, bool))
    assert gemm(good).shape == (10, 16) and gemm(list(good)).shape == (10, 16)  # host arrays and lists
    assert gemm(np.ones(1, np.float32)).shape == (10, 16)  # a size-1 array is a scalar
    traced = jax.jit(gemm)(jnp.asarray(good))  # a traced [R] scale cannot be checked, only shaped
    np.testing.assert_array_equal(np.asarray(traced), np.asarray(gemm(good)))
    with pytest.raises(ValueError, match="lhs_scale must be a scalar or hold one scale per row"):
        jax.jit(gemm)(jnp.ones(9))


@pytest.mark.parametrize("value", ["per_row", "dynamic", ""])
def test_bad_scale_strings_are_named(rng, problem, value):
    r = w4.route(problem["topk_ids"], E, implementation="reference")
    c1 = jnp.asarray(rng.standard_normal((M * K, 2 * I)), jnp.bfloat16)
    for call in (lambda: w4.quantize_fp8(problem["x"], value),
                 lambda: w4.gather_quantize(problem["x"], r.positions, value, implementation="reference"),
                 lambda: w4.silu_mul_quantize(c1, r.group_offsets, value, implementation="reference")):
        with pytest.raises(ValueError, match=r'^scale must be a number, None \(dynamic per tensor\) or "per_token"'):
            call()
    with pytest.raises(ValueError, match='scale="per_token" needs an x of rank >= 1'):
        w4.quantize_fp8(jnp.float32(3.0), "per_token")


@pytest.mark.skipif(not w4.grouped_gemm_configs(), reason="the configuration names come from the CUDA module")
def test_grouped_gemm_config_is_checked_on_the_reference_path_too(rng):
    """A typo in config= shows on the CPU, not only once the code meets a GPU."""
    w = weights(rng, E, 16, 256)
    lhs = jnp.asarray(rng.standard_normal((10, 256)), jnp.float8_e4m3fn)
    off = jnp.asarray([0, 3, 3, 7, 9], jnp.int32)
    with pytest.raises(ValueError, match="config must name a configuration from grouped_gemm_configs"):
        w4.grouped_gemm(lhs, 0.1, w, off, config="bogus", implementation="reference")
    inexact = next(c.name for c in w4.grouped_gemm_configs() if not c.exact)
    with pytest.raises(ValueError, match="is not exact"):
        w4.grouped_gemm(lhs, 0.1, w, off, config=inexact, precision=jax.lax.Precision.HIGHEST,
                        implementation="reference")
    exact = next(c.name for c in w4.grouped_gemm_configs() if c.exact)
    got = w4.grouped_gemm(lhs, 0.1, w, off, config=exact, implementation="reference")
    np.testing.assert_array_equal(np.asarray(got.astype(jnp.float32)),
                                  np.asarray(w4.grouped_gemm(lhs, 0.1, w, off, implementation="reference")
                                             .astype(jnp.float32)))


# ------------------------------------------------------------------------------------------
# W4Weights / quantize_weights / pack_int4
# ------------------------------------------------------------------------------------------
def test_w4weights_bad_inputs(rng):
    packed = jnp.asarray(rng.integers(0, 256, (E, 8, 128), dtype=np.uint8))  # K = 256
    scales = jnp.asarray(rng.standard_normal((E, 8, 2)), jnp.float32)
    assert w4.W4Weights(packed, scales).in_features == 256
    for bad, exc in ((packed[0], ValueError), (packed[None], ValueError), (packed.astype(jnp.int32), TypeError),
                     (packed.astype(jnp.float32), TypeError), (packed.astype(jnp.uint16), TypeError)):
        with pytest.raises(exc, match="packed"):
            w4.W4Weights(bad, scales)
    for bad, exc in ((scales[0], ValueError), (scales.astype(jnp.int32), TypeError), (scales[..., :1], ValueError),
                     (scales[:, :4], ValueError), (scales[:2], ValueError)):
        with pytest.raises(exc, match="scales"):
            w4.W4Weights(packed, bad)
    # K not a multiple of group_size (K = 192 with 128; K = 256 with 96), and K = 0.
    with pytest.raises(ValueError, match="packed: K = 192"):
        w4.W4Weights(packed[..., :96], scales[..., :1])
    with pytest.raises(ValueError, match="group_size"):
        w4.W4Weights(packed, scales, 96)
    with pytest.raises(ValueError, match="packed"):
        w4.W4Weights(packed[..., :0], scales[..., :0])
    for gs in (0, -128, 3, 127, 128.0, True, "128", None):
        with pytest.raises(ValueError, match="group_size"):
            w4.W4Weights(packed, scales, gs)
    # number of experts outside [1, 1024]
    with pytest.raises(ValueError, match="packed"):
        w4.W4Weights(jnp.zeros((1025, 1, 1), jnp.uint8) + 17, jnp.ones((1025, 1, 1), jnp.float32))
    with pytest.raises(ValueError, match="packed"):
        w4.W4Weights(packed[:0], scales[:0])
    assert w4.W4Weights(jnp.zeros((1024, 1, 1), jnp.uint8) + 17, jnp.ones((1024, 1, 1)), 2).num_experts == 1024


def test_quantize_weights_and_pack_bad_inputs(rng):
    w = rng.standard_normal((2, 4, 256)).astype(np.float32)
    for bad, exc in ((w[0], ValueError), (w[None], ValueError), (w.astype(np.int32), TypeError)):
        with pytest.raises(exc, match="w"):
            w4.quantize_weights(bad)
    with pytest.raises(ValueError, match="K = 192"):  # not a multiple of group_size
        w4.quantize_weights(w[..., :192])
    with pytest.raises(ValueError, match="K = 129"):  # odd K: can never pack two per byte
        w4.quantize_weights(w[..., :129], 128)
    with pytest.raises(ValueError, match="K = 7"):
        w4.quantize_weights(w[..., :7], 2)
    for gs in (0, 3, 128.0, True):
        with pytest.raises(ValueError, match="group_size"):
            w4.quantize_weights(w, gs)
    with pytest.raises(ValueError, match="values"):
        w4.pack_int4(jnp.asarray(rng.integers(-8, 8, size=(3, 5)), jnp.int8))


# ------------------------------------------------------------------------------------------
# deepseek_topk
# ------------------------------------------------------------------------------------------
def test_deepseek_topk_bad_inputs(rng):
    logits = jnp.asarray(rng.standard_normal((3, 64)), jnp.float32)
    bias = jnp.asarray(rng.standard_normal(64) * 0.01, jnp.float32)
    call = lambda lg=logits, b=bias, **kw: w4.deepseek_topk(lg, b, **{**dict(top_k=4, n_group=8, topk_group=2), **kw})  # noqa: E731
    assert call()[1].shape == (3, 4)
    for bad, exc in ((logits[0], ValueError), (logits.astype(jnp.int32), TypeError),
                     (jnp.asarray(logits, ml_dtypes.bfloat16)[None], ValueError)):
        with pytest.raises(exc, match="logits"):
            call(lg=bad)
    for bad, exc in ((bias[None], ValueError), (bias.astype(jnp.int32), TypeError), (bias[:32], ValueError)):
        with pytest.raises(exc, match="bias"):
            call(b=bad)
    for kw, name in ((dict(n_group=0), "n_group"), (dict(n_group=7), "n_group"), (dict(n_group=64, topk_group=2), "2 experts"),
                     (dict(topk_group=0), "topk_group"), (dict(topk_group=9), "topk_group"),
                     (dict(top_k=0), "top_k"), (dict(top_k=17), "top_k")):
        with pytest.raises(ValueError, match=name):
            call(**kw)
    for kw, name in ((dict(top_k=4.0), "top_k"), (dict(n_group=8.0), "n_group"), (dict(topk_group=2.0), "topk_group"),
                     (dict(top_k=True), "top_k"), (dict(top_k="4"), "top_k")):
        with pytest.raises(TypeError, match=name):
            call(**kw)


def test_low_precision_float_scales_are_accepted_eagerly():
    """bf16 (an ml_dtypes type) and f16 scales work eagerly as they do under jit."""
    x = jnp.asarray(np.linspace(-1, 1, 16, dtype=np.float32))
    for scale in (jnp.array(0.01, jnp.bfloat16), np.float16(0.01), jnp.array(0.01, jnp.float16)):
        eager, _ = w4.quantize_fp8(x, scale)
        jitted, _ = jax.jit(lambda x, s: w4.quantize_fp8(x, s))(x, scale)
        np.testing.assert_array_equal(np.asarray(eager, np.float32), np.asarray(jitted, np.float32))


def test_traced_static_arguments_say_how_to_pass_them(rng):
    """Static arguments reached by jax.jit's tracing name the argument and the remedy."""
    logits = jnp.asarray(rng.standard_normal((3, 16)), jnp.float32)
    with pytest.raises(TypeError, match="top_k must be a Python int.*close over it or list it in static_argnames"):
        jax.jit(lambda lg, k: w4.deepseek_topk(lg, top_k=k, n_group=4, topk_group=2))(logits, 4)
    rows = jnp.asarray(rng.standard_normal((6, 8)), jnp.bfloat16)
    pos = jnp.asarray([[0, 1], [2, 3], [4, 5]], jnp.int32)
    tw = jnp.ones((3, 2), jnp.float32)
    with pytest.raises(TypeError, match="routed_scaling_factor must be a static real number.*static_argnames"):
        jax.jit(lambda f: w4.combine(rows, pos, tw, f, implementation="reference"))(2.5)
    with pytest.raises(TypeError, match="num_experts must be a Python int.*static_argnames"):
        jax.jit(lambda e: w4.route(pos, e, implementation="reference"))(8)


# ------------------------------------------------------------------------------------------
# dtype errors name the dtype the caller passed
# ------------------------------------------------------------------------------------------
def _ints(r, *shape):
    return r.integers(-3, 3, size=shape)  # int64


def _offsets_f64():
    return [0.0, 3.0, 3.0, 7.0, 9.0]


def _ids_f64(r):
    return r.integers(0, E, size=(M, K)) + 0.5


def _lhs(r):
    return jnp.asarray(r.standard_normal((10, 256)), jnp.float8_e4m3fn)


# Without jax_enable_x64, jnp.asarray narrows int64 / float64 (NumPy arrays, Python lists) to
# 32 bits: a check after it named int32 / float32, a dtype nobody passed.
@pytest.mark.parametrize("call,message", [
    (lambda r, p: w4.quantize_weights(_ints(r, 2, 4, 256)), r"w must be floating point, got int64"),
    (lambda r, p: w4.quantize_weights(_ints(r, 2, 4, 256).tolist()), r"w must be floating point, got int64"),
    (lambda r, p: w4.W4Weights(r.integers(0, 256, (E, 8, 128)), np.ones((E, 8, 2), np.float32)),
     r"packed must be uint8 \(or a checkpoint's int8\), got int64"),
    (lambda r, p: w4.W4Weights(p["w2"].packed, r.integers(1, 3, (E, H, 1))), r"scales must be floating point, got int64"),
    (lambda r, p: w4.route(_ids_f64(r), E), r"topk_ids must be an integer array, got dtype float64"),
    (lambda r, p: w4.route(_ids_f64(r).tolist(), E), r"topk_ids must be an integer array, got dtype float64"),
    (lambda r, p: w4.gather_quantize(p["x"], _ids_f64(r).tolist()), r"positions must be an integer array, got dtype float64"),
    (lambda r, p: w4.gather_quantize(_ints(r, M, H).tolist(), p["topk_ids"]), r"x must be a floating-point array, got dtype int64"),
    (lambda r, p: w4.grouped_gemm(_lhs(r), 0.1, weights(r, E, 16, 256), _offsets_f64()),
     r"group_offsets must be an integer array, got dtype float64"),
    (lambda r, p: w4.grouped_gemm(r.standard_normal((10, 256)), 0.1, weights(r, E, 16, 256), [0, 3, 3, 7, 9]),
     r"lhs must have dtype float8_e4m3fn, got float64"),
    (lambda r, p: w4.grouped_gemm(_ints(r, 10, 256).tolist(), 0.1, weights(r, E, 16, 256), [0, 3, 3, 7, 9]),
     r"lhs must have dtype float8_e4m3fn, got int64"),
    (lambda r, p: w4.silu_mul_quantize(_ints(r, M, 2 * I).tolist(), [0, 1, 2, 3, M]), r"c1 must have dtype bfloat16, got int64"),
    (lambda r, p: w4.silu_mul_quantize(jnp.ones((M, 2 * I), jnp.bfloat16), _offsets_f64()),
     r"group_offsets must be an integer array, got dtype float64"),
    (lambda r, p: w4.combine(_ints(r, M, H).tolist(), p["topk_ids"], p["topk_weights"]), r"rows must have dtype bfloat16, got int64"),
    (lambda r, p: w4.combine(p["x"], p["topk_ids"], _ints(r, M, K).tolist()),
     r"topk_weights must be a floating-point array, got dtype int64"),
    (lambda r, p: w4.moe(_ints(r, M, H), p["topk_ids"], p["topk_weights"], p["w13"], p["w2"]),
     r"x must be a floating-point array, got dtype int64"),
    (lambda r, p: w4.moe(_ints(r, M, H).tolist(), p["topk_ids"], p["topk_weights"], p["w13"], p["w2"]),
     r"x must be a floating-point array, got dtype int64"),
    (lambda r, p: w4.moe(p["x"], _ids_f64(r).tolist(), p["topk_weights"], p["w13"], p["w2"]),
     r"topk_ids must be an integer array, got dtype float64"),
    (lambda r, p: w4.moe(p["x"], p["topk_ids"], _ints(r, M, K).tolist(), p["w13"], p["w2"]),
     r"topk_weights must be a floating-point array, got dtype int64"),
    (lambda r, p: w4.ragged_dot(_ints(r, M, H).tolist(), weights(r, E, 16, H), [1, 1, 0, 1]),
     r"lhs must be a floating-point array, got dtype int64"),
    (lambda r, p: w4.ragged_dot(r.standard_normal((M, H)), weights(r, E, 16, H), [1.0, 1.0, 0.0, 1.0]),
     r"group_sizes must be an integer array, got dtype float64"),
    (lambda r, p: w4.deepseek_topk(_ints(r, M, 16).tolist()), r"logits must be a floating-point array, got dtype int64"),
    (lambda r, p: w4.quantize_fp8(_ints(r, M, H).tolist()), r"x must be a floating-point array, got dtype int64"),
], ids=lambda v: None if callable(v) else f"{v.split()[0]}-{v.split()[-1]}")
def test_dtype_errors_name_the_dtype_passed(rng, problem, call, message):
    with pytest.raises(TypeError, match=message):
        call(rng, problem)


def test_64_bit_host_inputs_of_valid_kinds_are_accepted(rng, problem):
    # The other side of the dtype checks: float64 weights and int64 indices are valid inputs.
    w = rng.standard_normal((2, 4, 256))
    np.testing.assert_array_equal(np.asarray(w4.quantize_weights(w).packed),
                                  np.asarray(w4.quantize_weights(w.astype(np.float32)).packed))
    ids = rng.integers(0, E, size=(M, K))
    got = w4.route(ids, E)
    np.testing.assert_array_equal(np.asarray(got.group_offsets), np.asarray(w4.route(ids.astype(np.int32), E).group_offsets))


# ------------------------------------------------------------------------------------------
# rhs in jax.lax.ragged_dot's orientation
# ------------------------------------------------------------------------------------------
TRANSPOSED = (r"lhs has K = 256 columns but rhs expects K = 128 \(rhs looks transposed: W4Weights are stored "
              r"\[E, N, K\] \(N-major, like checkpoints\), not jax.lax.ragged_dot's \[G, K, N\]; quantize the "
              r"transposed weights\)")


def test_transposed_rhs_is_named(rng):
    # ragged_dot's rhs is [G, K, N]: quantizing a [G, K = 256, N = 128] array as if it were
    # W4Weights' [G, N, K] gives weights with N = 256, K = 128.
    g, k, n, m = E, 256, 128, 10
    lax_rhs = rng.standard_normal((g, k, n)).astype(np.float32)
    wrong = w4.quantize_weights(lax_rhs)
    right = w4.quantize_weights(lax_rhs.transpose(0, 2, 1))
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    sizes = jnp.asarray([3, 0, 4, 3], jnp.int32)
    with pytest.raises(ValueError, match=TRANSPOSED):
        w4.ragged_dot(x, wrong, sizes, implementation="reference")
    lhs, scale = w4.quantize_fp8(x)
    offsets = jnp.asarray([0, 3, 3, 7, 10], jnp.int32)
    with pytest.raises(ValueError, match=TRANSPOSED):
        w4.grouped_gemm(lhs, scale, wrong, offsets, implementation="reference")
    assert w4.ragged_dot(x, right, sizes, implementation="reference").shape == (m, n)
    # A K mismatch that is not a transposition gets no hint.
    other = weights(rng, g, 64, 128)
    for call in (lambda: w4.ragged_dot(x, other, sizes, implementation="reference"),
                 lambda: w4.grouped_gemm(lhs, scale, other, offsets, implementation="reference")):
        with pytest.raises(ValueError, match=r"rhs expects K = 128$"):
            call()
