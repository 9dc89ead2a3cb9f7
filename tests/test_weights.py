"""int4 packing, W4Weights (checkpoint formats, dequantize, pytree) and quantize_weights."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import numpy_model as ref
import w4afp8_jax as w4


def random_weights(rng, e, n, k, group_size=128, scale_dtype=np.float32):
    packed = rng.integers(0, 256, size=(e, n, k // 2), dtype=np.uint8)
    scales = (rng.standard_normal((e, n, k // group_size)) * 0.005).astype(scale_dtype)
    return packed, scales


# ------------------------------------------------------------------------------------------
# pack_int4 / unpack_int4
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(2,), (3, 8), (2, 5, 256), (1, 1, 7168)])
def test_pack_unpack_roundtrip(rng, shape):
    values = rng.integers(-8, 8, size=shape).astype(np.int8)
    packed = w4.pack_int4(jnp.asarray(values))
    assert packed.dtype == jnp.uint8 and packed.shape == (*shape[:-1], shape[-1] // 2)
    np.testing.assert_array_equal(np.asarray(packed), ref.pack_int4(values))  # same bytes as the spec's rule
    unpacked = w4.unpack_int4(packed)
    assert unpacked.dtype == jnp.int8
    np.testing.assert_array_equal(np.asarray(unpacked), values)
    np.testing.assert_array_equal(ref.unpack_int4(np.asarray(packed)), values)


def test_nibble_order_all_pairs(rng):
    # Every (element 2i, element 2i+1) pair of int4 values, in random order: the byte must be
    # (hi & 0xF) << 4 | (lo & 0xF), i.e. element 2i in the low nibble.
    lo, hi = np.meshgrid(np.arange(-8, 8), np.arange(-8, 8), indexing="ij")
    pairs = np.stack([lo.ravel(), hi.ravel()], axis=1)[rng.permutation(256)]
    values = pairs.reshape(-1).astype(np.int8)
    expected = ((pairs[:, 1] & 0xF) << 4 | (pairs[:, 0] & 0xF)).astype(np.uint8)
    packed = np.asarray(w4.pack_int4(jnp.asarray(values)))
    np.testing.assert_array_equal(packed, expected)
    assert sorted(packed.tolist()) == list(range(256))  # all 256 bytes, i.e. all 16 nibbles in both halves
    np.testing.assert_array_equal(np.asarray(w4.unpack_int4(jnp.asarray(expected))), values)


def test_unpack_every_byte_and_int8_input(rng):
    # Spec: nibble n in [0, 16) means n if n < 8 else n - 16; a checkpoint's int8 bytes are the same bits.
    b = rng.permutation(256).astype(np.uint8)
    lo, hi = (b & 0xF).astype(int), (b >> 4).astype(int)
    signed = lambda n: np.where(n >= 8, n - 16, n)  # noqa: E731
    expected = np.stack([signed(lo), signed(hi)], axis=1).reshape(-1)
    np.testing.assert_array_equal(np.asarray(w4.unpack_int4(jnp.asarray(b))), expected)
    np.testing.assert_array_equal(np.asarray(w4.unpack_int4(jnp.asarray(b.view(np.int8)))), expected)
    np.testing.assert_array_equal(ref.unpack_int4(b), expected)


# ------------------------------------------------------------------------------------------
# W4Weights
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("e,n,k,gs", [(1, 4, 128, 128), (3, 16, 512, 128), (8, 5, 64, 32), (2, 3, 12, 2)])
def test_dequantize_matches_model(rng, e, n, k, gs):
    packed, scales = random_weights(rng, e, n, k, gs)
    w = w4.W4Weights(jnp.asarray(packed), jnp.asarray(scales), gs)
    assert (w.num_experts, w.out_features, w.in_features, w.group_size) == (e, n, k, gs)
    np.testing.assert_array_equal(np.asarray(w.int4_values()), ref.unpack_int4(packed))
    deq = np.asarray(w.dequantize())
    assert deq.dtype == np.float32 and deq.shape == (e, n, k)
    # int4 (4 bits) * f32 scale (24 bits) needs 27 bits: one f32 rounding, <= 2^-24 relative.
    np.testing.assert_allclose(deq, ref.dequantize(packed, scales, gs), rtol=2**-24, atol=0)


def test_int8_checkpoint_packing_bit_for_bit(rng):
    packed, scales = random_weights(rng, 4, 8, 256)
    w = w4.W4Weights(jnp.asarray(packed.view(np.int8)), jnp.asarray(scales))
    assert w.packed.dtype == jnp.uint8
    np.testing.assert_array_equal(np.asarray(w.packed), packed)
    np.testing.assert_allclose(np.asarray(w.dequantize()), ref.dequantize(packed, scales, 128), rtol=2**-24, atol=0)
    # numpy int8 (not yet a JAX array) is accepted the same way
    w_np = w4.W4Weights(packed.view(np.int8), scales)
    np.testing.assert_array_equal(np.asarray(w_np.packed), packed)


@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, np.float16])
def test_low_precision_scales_widen_exactly(rng, dtype):
    packed, scales = random_weights(rng, 3, 4, 256, scale_dtype=dtype)
    w = w4.W4Weights(jnp.asarray(packed), jnp.asarray(scales))
    assert w.scales.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(w.scales), scales.astype(np.float32))  # widening is exact
    # 16-bit scale (<= 11 significant bits) * int4 (<= 4 bits) is exact in f32.
    np.testing.assert_array_equal(np.asarray(w.dequantize()), ref.dequantize(packed, scales.astype(np.float32), 128))


# ------------------------------------------------------------------------------------------
# pytree behaviour
# ------------------------------------------------------------------------------------------
def test_pytree_flatten_unflatten(rng):
    packed, scales = random_weights(rng, 2, 4, 256, 64)
    w = w4.W4Weights(jnp.asarray(packed), jnp.asarray(scales), 64)
    leaves, treedef = jax.tree_util.tree_flatten(w)
    assert len(leaves) == 2
    np.testing.assert_array_equal(np.asarray(leaves[0]), packed)
    np.testing.assert_array_equal(np.asarray(leaves[1]), scales)
    back = jax.tree_util.tree_unflatten(treedef, leaves)
    assert isinstance(back, w4.W4Weights) and back.group_size == 64
    np.testing.assert_array_equal(np.asarray(back.packed), packed)
    # group_size is static metadata: it lives in the treedef, not among the leaves
    other = w4.W4Weights(jnp.asarray(packed), jnp.asarray(scales[..., :2]), 128)
    assert jax.tree_util.tree_structure(other) != treedef
    doubled = jax.tree_util.tree_map(lambda a: a * 1, w)
    assert isinstance(doubled, w4.W4Weights) and doubled.group_size == 64


def test_pytree_through_jit(rng):
    packed, scales = random_weights(rng, 3, 8, 256, 128)
    traces = []

    @jax.jit
    def f(w):
        traces.append(w.group_size)
        assert isinstance(w.group_size, int)  # static, not traced
        return w.dequantize(), w

    for gs in (128, 64):
        s = scales if gs == 128 else np.repeat(scales, 2, axis=-1)
        w = w4.W4Weights(jnp.asarray(packed), jnp.asarray(s), gs)
        deq, w_out = f(w)
        np.testing.assert_allclose(np.asarray(deq), ref.dequantize(packed, s, gs), rtol=2**-24, atol=0)
        assert isinstance(w_out, w4.W4Weights) and w_out.group_size == gs
        np.testing.assert_array_equal(np.asarray(w_out.packed), packed)
        f(w)  # same structure: no retrace
    assert traces == [128, 64]


# ------------------------------------------------------------------------------------------
# quantize_weights
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("e,n,k,gs", [(2, 8, 256, 128), (3, 5, 96, 32), (1, 1, 128, 128)])
def test_quantize_weights_rule_and_error_bound(rng, e, n, k, gs):
    # Groups with very different magnitudes so the per-group scale matters.
    mags = np.exp(rng.uniform(-6, 2, size=(e, n, k // gs, 1)))
    w = (rng.standard_normal((e, n, k // gs, gs)) * mags).astype(np.float32)
    wq = w4.quantize_weights(jnp.asarray(w.reshape(e, n, k)), gs)
    assert isinstance(wq, w4.W4Weights) and wq.group_size == gs
    scales = np.asarray(wq.scales)
    q = ref.unpack_int4(np.asarray(wq.packed)).reshape(e, n, k // gs, gs)

    # Scale rule: amax / 7 in f32.
    amax = np.abs(w).max(axis=-1)
    np.testing.assert_array_equal(scales, (amax / np.float32(7)).astype(np.float32))
    # q = round-half-even(w / scale) in f32; nothing clips, the largest element maps to +-7.
    np.testing.assert_array_equal(q, np.round(w / scales[..., None]).astype(np.int8))
    assert q.min() >= -7 and q.max() <= 7
    arg = np.abs(w).argmax(axis=-1)[..., None]
    np.testing.assert_array_equal(np.take_along_axis(q, arg, -1), 7 * np.sign(np.take_along_axis(w, arg, -1)))
    # |w - q*scale| <= scale/2 exactly in real arithmetic; the f32 division w/scale can move the
    # quotient by 2^-24 relative (|w/scale| <= 7), hence a 2^-20 * scale slack.
    deq = ref.dequantize(np.asarray(wq.packed), scales, gs).reshape(w.shape)
    err = np.abs(w.astype(np.float64) - deq)
    assert np.all(err <= scales[..., None].astype(np.float64) * (0.5 + 2**-20))
    np.testing.assert_allclose(np.asarray(wq.dequantize()).reshape(w.shape), deq, rtol=2**-24, atol=0)


def test_quantize_weights_zero_group_and_bf16_input(rng):
    w = rng.standard_normal((2, 3, 256)).astype(ml_dtypes.bfloat16)
    w[1, 2, 128:] = 0  # one all-zero group: documented scale 1, q = 0
    wq = w4.quantize_weights(jnp.asarray(w), 128)
    scales = np.asarray(wq.scales)
    assert scales[1, 2, 1] == 1.0
    q = np.asarray(wq.int4_values())
    assert np.all(q[1, 2, 128:] == 0)
    w32 = w.astype(np.float32).reshape(2, 3, 2, 128)
    np.testing.assert_array_equal(scales[scales != 1.0], (np.abs(w32).max(-1) / np.float32(7))[scales != 1.0])


# ------------------------------------------------------------------------------------------
# host (numpy) arrays
# ------------------------------------------------------------------------------------------
def test_host_arrays_stay_on_the_host_and_convert_there(rng, tmp_path):
    packed, scales = random_weights(rng, 2, 16, 256, scale_dtype=ml_dtypes.bfloat16)
    path = tmp_path / "packed.bin"
    packed.view(np.int8).tofile(path)
    mapped = np.memmap(path, np.int8, "r", shape=packed.shape)  # as a safetensors/np.load mmap gives
    w = w4.W4Weights(mapped, scales)
    assert isinstance(w.packed, np.ndarray) and w.packed.dtype == np.uint8
    assert isinstance(w.packed, np.memmap)  # a view, nothing was read or copied
    assert isinstance(w.scales, np.ndarray) and w.scales.dtype == np.float32
    np.testing.assert_array_equal(w.packed, packed)
    np.testing.assert_array_equal(w.scales, scales.astype(np.float32))


def test_host_weights_work_under_jit_closed_over_and_as_arguments(rng):
    # int8 packing and bf16 scales from the host: both need conversion, both must stay traceable.
    e, h, inter, m = 4, 256, 128, 3
    p13, s13 = random_weights(rng, e, 2 * inter, h, scale_dtype=ml_dtypes.bfloat16)
    p2, s2 = random_weights(rng, e, h, inter)
    host = (w4.W4Weights(p13.view(np.int8), s13), w4.W4Weights(p2, s2))
    device = tuple(jax.tree.map(jnp.asarray, w) for w in host)
    x = jnp.asarray(rng.standard_normal((m, h)), jnp.bfloat16)
    ids = jnp.asarray(np.stack([rng.choice(e, 2, replace=False) for _ in range(m)]).astype(np.int32))
    tw = jnp.full((m, 2), 0.5, jnp.float32)

    def layer(x, w13, w2):
        return w4.moe(x, ids, tw, w13, w2, a1_scale=0.01, a2_scale=0.02, implementation="reference")

    want = np.asarray(jax.jit(layer)(x, *device).astype(jnp.float32))
    assert np.any(want != 0)
    closed = jax.jit(lambda x: layer(x, *host))(x)
    np.testing.assert_array_equal(np.asarray(closed.astype(jnp.float32)), want)
    tiled = tuple(w.prepare() for w in host)  # permuted on the host, still numpy
    assert all(isinstance(w.packed, np.ndarray) for w in tiled)
    passed = jax.jit(layer)(x, *tiled)
    np.testing.assert_array_equal(np.asarray(passed.astype(jnp.float32)), want)


def test_int8_tracer_is_bitcast_not_converted_to_numpy(rng):
    packed, scales = random_weights(rng, 2, 4, 256)

    @jax.jit
    def build(p, s):
        return w4.W4Weights(p, s).dequantize()

    got = build(jnp.asarray(packed.view(np.int8)), jnp.asarray(scales.astype(ml_dtypes.bfloat16)))
    np.testing.assert_array_equal(got, ref.dequantize(packed, scales.astype(ml_dtypes.bfloat16).astype(np.float32), 128))


# ------------------------------------------------------------------------------------------
# non-finite weights and scales
# ------------------------------------------------------------------------------------------
def with_bad_values(rng, w, values):
    """w with `values` at distinct random indices (a copy), and the first of them in row-major order."""
    w = w.copy()
    flat = rng.choice(w.size, size=len(values), replace=False)
    w.reshape(-1)[flat] = values
    return w, np.unravel_index(flat.min(), w.shape)


def index_text(index):
    return r"\[" + ", ".join(str(int(i)) for i in index) + r"\]"


@pytest.mark.parametrize("shape", [(1, 16, 128), (16, 256, 256)])  # the two sizes
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_quantize_weights_rejects_non_finite_concrete_weights(rng, shape, bad):
    w, first = with_bad_values(rng, rng.standard_normal(shape).astype(np.float32), [bad, np.nan])
    message = rf"w{index_text(first)} is {float(w[first])}: weights must be finite"
    wd = jnp.asarray(w)
    for arg in (w, w.astype(ml_dtypes.bfloat16), wd):  # host (checked on the host) and device
        with pytest.raises(ValueError, match=message):
            w4.quantize_weights(arg)
    with pytest.raises(ValueError, match=message):  # a concrete device array closed over under jit
        jax.jit(lambda: w4.quantize_weights(wd).packed)()


@pytest.mark.parametrize("shape", [(1, 16, 128), (16, 256, 256)])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_quantize_weights_traced_rule_nan_scale_for_the_group(rng, shape, bad):
    # Under jit nothing can raise: the group holding a non-finite value gets scale NaN and codes
    # 0, at any array size (the old code gave scale 1 and changed the group's other codes at one
    # size, code 0 at another, scale inf and NaN codes for an inf); every other group is exactly
    # as without it.
    clean = rng.standard_normal(shape).astype(np.float32)
    e, n, k = shape
    idx = (rng.integers(e), rng.integers(n), rng.integers(k))
    w = clean.copy()
    w[idx] = bad
    packed, scales = jax.jit(lambda w: (lambda q: (q.packed, q.scales))(w4.quantize_weights(w)))(w)
    want = w4.quantize_weights(clean)
    group = (*idx[:2], idx[2] // 128)
    scales, want_scales = np.asarray(scales), np.asarray(want.scales)
    assert np.isnan(scales[group]) and np.isnan(scales).sum() == 1
    others = ~np.isnan(scales)
    np.testing.assert_array_equal(scales[others], want_scales[others])
    codes = ref.unpack_int4(np.asarray(packed)).reshape(e, n, k // 128, 128)
    want_codes = ref.unpack_int4(np.asarray(want.packed)).reshape(e, n, k // 128, 128)
    assert np.all(codes[group] == 0)
    np.testing.assert_array_equal(codes[others], want_codes[others])
    # Returned from jit, the weights become concrete, and concrete W4Weights never hold a NaN scale.
    # The message says where such scales come from (the caller passed w, never scales).
    with pytest.raises(ValueError, match=rf"scales{index_text(group)} is nan: weight scales must be finite "
                                         r"\(quantize_weights under jit gives a NaN scale"):
        jax.jit(w4.quantize_weights)(w)


def test_quantize_weights_float64_beyond_float32_range_is_rejected(rng):
    # The math is f32: 1e39 would become inf there (scale inf, a NaN group) without a word.
    w, first = with_bad_values(rng, rng.standard_normal((2, 16, 256)), [1e39, -1e300])
    with pytest.raises(ValueError, match=rf"w{index_text(first)} is -?inf: weights \(as float32\) must be finite"):
        w4.quantize_weights(w)


def test_traced_non_finite_weight_makes_its_tokens_nan_and_no_others(rng):
    # The traced rule through the layer: a NaN scale in w13 row n of expert e reaches c1[:, n] of
    # e's rows, hence h, q2 and every output channel of the tokens routed to e; static scales, so
    # every other token is bitwise the layer with clean weights.
    e, h, inter, m, k = 4, 256, 128, 12, 2
    w13 = rng.standard_normal((e, 2 * inter, h)).astype(np.float32) * 0.05
    w2 = w4.quantize_weights(rng.standard_normal((e, h, inter)).astype(np.float32) * 0.05)
    ids = np.stack([rng.choice(e, k, replace=False) for _ in range(m)]).astype(np.int32)
    ids[0] = [1, 2]  # at least one token on the bad expert, and one off it
    ids[1] = [0, 3]
    x = jnp.asarray(rng.standard_normal((m, h)), jnp.bfloat16)
    tw = jnp.asarray(rng.random((m, k)), jnp.float32)
    bad = w13.copy()
    bad[1, rng.integers(inter), rng.integers(h)] = np.nan  # a gate row of expert 1

    @jax.jit
    def layer(w13):
        return w4.moe(x, ids, tw, w4.quantize_weights(w13), w2, a1_scale=0.02, a2_scale=0.01,
                      implementation="reference").astype(jnp.float32)

    got, want = np.asarray(layer(bad)), np.asarray(layer(w13))
    on_bad = (ids == 1).any(axis=1)
    assert np.all(np.isnan(got[on_bad])) and np.isfinite(want).all()
    np.testing.assert_array_equal(got[~on_bad], want[~on_bad])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_w4weights_rejects_non_finite_concrete_scales(rng, bad, tmp_path):
    packed, scales = random_weights(rng, 3, 16, 512)
    scales, first = with_bad_values(rng, scales, [bad, np.nan])
    message = rf"scales{index_text(first)} is {float(scales[first])}: weight scales must be finite"
    path = tmp_path / "scales.bin"
    scales.tofile(path)
    mapped = np.memmap(path, np.float32, "r", shape=scales.shape)
    for arg in (scales, mapped, scales.astype(ml_dtypes.bfloat16), jnp.asarray(scales)):
        with pytest.raises(ValueError, match=message):
            w4.W4Weights(packed, arg)
    stacked = np.stack([np.ones_like(scales), scales])  # [L, E, N, K/128]: the index names the layer too
    with pytest.raises(ValueError, match=rf"scales\[1, {', '.join(str(int(i)) for i in first)}\]"):
        w4.W4Weights(np.stack([packed, packed]), stacked)
    # Traced scales cannot be checked: built under jit, they give NaN where they multiply.
    deq = jax.jit(lambda p, s: w4.W4Weights(p, s).dequantize())(packed, scales)
    e, n, g = first
    assert np.isnan(np.asarray(deq)[e, n, g * 128:(g + 1) * 128]).all()


def test_w4weights_host_scales_checked_in_blocks_and_once(rng, monkeypatch, tmp_path):
    # A memory-mapped stack is read once: in blocks along its first axis (the index of a value
    # past the first block comes out right), and not again when W4Weights is rebuilt around the
    # same scales (layer(), prepare(), pytree maps).
    import w4afp8_jax._validate as validate
    monkeypatch.setattr(validate, "HOST_BLOCK_ELEMENTS", 2 * 16 * 4)  # two experts' scales per block
    packed = rng.integers(0, 256, (2, 5, 16, 256), dtype=np.uint8)
    scales = rng.random((2, 5, 16, 4), dtype=np.float32) + 0.1
    bad = scales.copy()
    bad[1, 3, 7, 2] = np.nan
    with pytest.raises(ValueError, match=r"scales\[1, 3, 7, 2\] is nan"):
        w4.W4Weights(packed, bad)
    path = tmp_path / "scales.bin"
    scales.tofile(path)
    mapped = np.memmap(path, np.float32, "r", shape=scales.shape)
    calls = []
    check = w4.weights.require_finite
    monkeypatch.setattr(w4.weights, "require_finite", lambda *a: (calls.append(a[0]), check(*a)))
    w = w4.W4Weights(packed, mapped)
    assert isinstance(w.scales, np.memmap)
    view = w.layer(1)
    view.prepare().selected()
    view.dequantize()
    jax.tree.map(lambda a: a, view)
    assert calls == ["scales"]
    jax.tree.map(jnp.asarray, w)  # a device copy is a new array, checked (once) on the device
    assert calls == ["scales", "scales"]


def test_w4weights_accepts_zero_and_negative_scales(rng):
    # Any finite scale is valid: the dequantized weight is int4 * scale whatever its sign, and a
    # zero scale (e.g. an all-zero group's) contributes exactly 0.
    packed, scales = random_weights(rng, 2, 4, 256)
    scales[0, 1, 0], scales[1, 2, 1] = 0.0, -abs(scales[1, 2, 1])
    w = w4.W4Weights(packed, scales)
    np.testing.assert_allclose(np.asarray(w.dequantize()), ref.dequantize(packed, scales, 128), rtol=2**-24, atol=0)
