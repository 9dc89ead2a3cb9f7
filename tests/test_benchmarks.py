"""The benchmarks' CPU pieces: floors, problem builders, the decode program's layer loops, timing
arithmetic and report formatting (the GPU runs are the lead's; these keep the harness honest)."""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import bench_decode  # noqa: E402
import problems as P  # noqa: E402
import reports  # noqa: E402
import timing  # noqa: E402


def test_floors_match_the_documented_numbers():
    shape = P.shape_for(dry_run=False)
    # Expected experts hit under uniform top-8 routing (docs: 8, 31, 102, 163, 222).
    hits = [round(P.expected_experts_hit(b, shape.experts, shape.top_k)) for b in (1, 4, 16, 32, 64)]
    assert hits == [8, 31, 102, 163, 222]
    (n1, k1), (n2, k2) = shape.gemm1(), shape.gemm2()
    assert (n1, k1, n2, k2) == (1024, 7168, 7168, 512)
    # One expert: 3.90 MB (GEMM1) and 1.95 MB (GEMM2) of int4 + f32 scales.
    assert P.weight_bytes_per_expert(n1, k1) == 1024 * 3584 + 1024 * 56 * 4 == 3_899_392
    assert P.weight_bytes_per_expert(n2, k2) == 7168 * 256 + 7168 * 4 * 4 == 1_949_696
    rates = {"copy_bytes_per_s": 4.2e12, "fp8_flops_per_s": 1.43e15}
    f = P.gemm_floor(8, 8, n1, k1, rates)
    assert f["weight_floor_us"] == pytest.approx(8 * 3_899_392 / 4.2e12 * 1e6)  # 7.4 us
    assert f["mem_floor_us"] == pytest.approx((8 * 3_899_392 + 8 * k1 + 8 * n1 * 2) / 4.2e12 * 1e6)
    assert f["floor_us"] == f["mem_floor_us"] > f["compute_floor_us"]
    big = P.gemm_floor(256, 65536, n1, k1, rates)
    assert big["floor_us"] == big["compute_floor_us"] == pytest.approx(2 * 65536 * n1 * k1 / 1.43e15 * 1e6)
    fr = P.fractions(2 * big["floor_us"], big, rates)
    assert fr["fp8_fraction"] == pytest.approx(0.5)
    assert P.fractions(None, big, rates) == {"mem_fraction": None, "fp8_fraction": None}


def test_experts_hit_and_routing_builders():
    assert P.experts_hit(np.array([[0, 3], [3, 5], [-1, 16]]), 16) == 3  # -1 and 16 are dropped ids
    ids = P.uniform_topk_ids(jax.random.key(0), 64, 16, 8)
    assert ids.shape == (64, 8) and ids.dtype == jnp.int32
    assert all(len(set(row)) == 8 for row in np.asarray(ids).tolist())  # distinct experts per token
    offsets = np.asarray(P.group_offsets_of(ids, 16))
    np.testing.assert_array_equal(offsets, np.concatenate([[0], np.cumsum(np.bincount(np.asarray(ids).ravel(),
                                                                                      minlength=16))]))
    w = P.random_topk_weights(jax.random.key(1), 5, 8)
    np.testing.assert_allclose(np.asarray(w).sum(axis=1), 1.0, rtol=1e-6)


def test_random_weights_are_random_bytes_and_positive_scales():
    packed, scales = P.random_packed_scales(jax.random.key(2), (2, 3), 32, 256)
    assert packed.shape == (2, 3, 32, 128) and packed.dtype == jnp.uint8
    assert scales.shape == (2, 3, 32, 2) and scales.dtype == jnp.float32
    counts = np.bincount(np.asarray(packed).ravel(), minlength=256)
    assert counts.min() > 0  # 24576 bytes: every value appears (expected 96 each)
    assert not np.array_equal(np.asarray(packed[0, 0]), np.asarray(packed[1, 2]))  # independent per expert
    assert float(scales.min()) >= 0.0025 and float(scales.max()) <= 0.0075


def test_slope_and_tables():
    per, d = timing.slope(1.0e-3, 2.0e-3, 10)
    assert per == pytest.approx(1e-4) and d["method"] == "slope"
    per, d = timing.slope(1.0e-3, 1.01e-3, 10)  # difference swamped by noise: the upper bound
    assert per == pytest.approx(1.01e-3 / 20) and d["method"].startswith("upper bound")
    text = reports.format_table("t", ["B", "us"], [[1, 2.345], [64, None]], ["n"])
    assert text.splitlines()[2:] == [" B    us", "--  ----", " 1  2.35", "64   n/a", "  note: n"]
    assert reports.clean({"a": float("nan"), "b": np.int64(3), "c": (np.float32(1.5),)}) == {"a": None, "b": 3,
                                                                                             "c": [1.5]}
    rows = [{"B": 1, "peers": {"x": {"us": None, "note": "n/a: no"}}}, {"B": 4, "peers": {"x": {"us": None,
                                                                                           "note": "n/a: no"}}}]
    assert reports.peer_notes(rows) == ["x at B=1,4: n/a: no"]


def test_ncu_csv_reader(tmp_path):
    path = tmp_path / "ncu.csv"
    header = '"ID","Kernel Name","Metric Name","Metric Unit","Metric Value"'
    path.write_text("==PROF== noise\n" + "\n".join([
        header, '"1","B","gpu__time_duration.sum","usecond","2.5"', '"0","A","gpu__time_duration.sum","nsecond",'
        '"1,500"', '"0","A","other","byte","7"']) + "\n")
    assert timing.ncu_kernel_times(str(path)) == [("A", 1.5), ("B", 2.5)]


def test_decode_layer_loops_agree():
    """The scanned and the unrolled layer loops compute the same layers; two passes = the layer
    stack applied twice (the reference path, dry-run shapes)."""
    shape = P.shape_for(dry_run=True)
    num_layers, tokens = 2, 2
    weights = bench_decode.make_layers(jax.random.key(3), shape, num_layers)
    uniform = bench_decode.uniform_routing(jax.random.key(4), shape, num_layers, tokens)
    body = bench_decode.bodies(shape, "reference", None, 0.01, 0.01)["layer_uniform"]
    h0 = jax.random.normal(jax.random.key(5), (tokens, shape.hidden), jnp.bfloat16)
    results = {}
    for loop in ("scan", "unrolled"):
        stack = weights if loop == "scan" else bench_decode.unstack(weights)
        layers = bench_decode.layer_args(stack, uniform, loop)
        results[loop] = [jax.jit(bench_decode.program(body, loop, passes))(h0, layers)[0] for passes in (1, 2)]
    # Not bit for bit: XLA compiles the scan body and the unrolled layers separately and may
    # order f32 operations differently; a last-bit change before a quantization can flip an
    # fp8 code (one fp8 step, 2^-3 relative, on a few entries). A wrong layer order or layer
    # weights would be O(1) apart.
    def close(a, b):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.linalg.norm(a - b) <= 1e-2 * np.linalg.norm(b)

    close(results["scan"][0], results["unrolled"][0])
    close(results["scan"][1], results["unrolled"][1])
    layers = bench_decode.layer_args(weights, uniform, "scan")
    once = jax.jit(bench_decode.program(body, "scan", 1))
    close(results["scan"][1], once(once(h0, layers)[0], layers)[0])
    swapped = bench_decode.layer_args(jax.tree.map(lambda a: a[::-1], weights), uniform, "scan")
    assert np.linalg.norm(np.asarray(once(h0, swapped)[0], np.float32) - np.asarray(results["scan"][0], np.float32)) \
        > 0.1 * np.linalg.norm(np.asarray(results["scan"][0], np.float32) - np.asarray(h0, np.float32))
