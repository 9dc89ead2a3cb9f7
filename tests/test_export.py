"""jax.export round trips (README, "Exported programs"): jitted layers taking or returning the
library's pytrees (W4Weights in both layouts and another group size, layer() views of a stack,
MoEExperts, Routing) serialize, and a fresh Python process that imports only jax, numpy and
w4afp8_jax deserializes and calls them with results bitwise equal to the jitted functions.
The CUDA path's programs name only FFI targets that `w4afp8_jax.export.disabled_checks()`
lists (checked by lowering for CUDA on any machine with the CUDA module) and round-trip the same
way on a GPU."""

import os
import pickle
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import w4afp8_jax as w4
from w4afp8_jax import _backend
from helpers import int4_weights, routed_tokens

E, H, I, M, K, L = 4, 256, 256, 6, 2, 2
SCALES = dict(a1_scale=0.02, a2_scale=0.01, routed_scaling_factor=2.5)
FORMS = ("weights_as_arguments", "weights_closed_over", "layer_view_as_argument", "scan_over_layer_views",
         "moe_experts_as_argument", "routing_as_output")

# The loading process: nothing but jax, numpy and w4afp8_jax (plus the CUDA targets for CUDA
# programs), as a user's serving process would.
CHILD = """
import pickle, sys
import jax, numpy as np
import w4afp8_jax
if sys.argv[3] == "cuda":
    w4afp8_jax.export.register_cuda_targets()
with open(sys.argv[1], "rb") as f:
    programs = pickle.load(f)
outputs = {name: jax.tree.map(np.asarray, jax.export.deserialize(blob).call(*args))
           for name, (blob, args) in programs.items()}
with open(sys.argv[2], "wb") as f:
    pickle.dump(outputs, f)
"""


def stack(sets):
    return w4.W4Weights(np.stack([w.packed for w in sets]), np.stack([w.scales for w in sets]),
                        sets[0].group_size, sets[0].layout)


def programs(rng, implementation):
    """{form: (function, args)} for every name in FORMS: the layer in every form a user may export. On the reference
    path w2 has group size 64, so a non-default static field must round-trip."""
    layer = lambda x, ids, tw, w13, w2, **scales: w4.moe(x, ids, tw, w13, w2, implementation=implementation,
                                                        **{**SCALES, **scales})
    gs2 = 64 if implementation == "reference" else 128
    w13s = [w4.W4Weights(*int4_weights(rng, E, 2 * I, H)).prepare() for _ in range(L)]  # tiled
    w2s = [w4.W4Weights(*int4_weights(rng, E, H, I, gs2), gs2) for _ in range(L)]        # checkpoint
    w13, w2 = w13s[0], w2s[0]
    w13_stack, w2_stack = stack(w13s), stack(w2s)
    tokens = routed_tokens(rng, M, H, E, K)
    # Every static field off its default, so that a field lost in serialization fails the call.
    experts = w4.MoEExperts(w13_stack, w2_stack, np.array([0.02, 0.03], np.float32), None, layers=(3, 7),
                            activation_scaling="per_token")

    def scan_views(x, ids, tw, w13_stack, w2_stack):
        one = lambda x, i: (layer(x, ids, tw, w13_stack.layer(i), w2_stack.layer(i)).astype(x.dtype), None)
        return jax.lax.scan(one, x, jnp.arange(L))[0]

    def scan_experts(x, ids, tw, experts):
        def one(x, i):
            y = layer(x, ids, tw, experts.w13.layer(i), experts.w2.layer(i), a1_scale=experts.a1_scale[i],
                      a2_scale=experts.a2_scale)
            return y.astype(x.dtype), None
        return jax.lax.scan(one, x, jnp.arange(L))[0]

    return dict(zip(FORMS, [
        (layer, (*tokens, w13, w2)),
        (lambda x, ids, tw: layer(x, ids, tw, w13, w2), tokens),
        (layer, (*tokens, w13_stack.layer(1), w2_stack.layer(1))),
        (scan_views, (*tokens, w13_stack, w2_stack)),
        (scan_experts, (*tokens, experts)),
        (lambda ids: w4.route(ids, E, implementation=implementation), (tokens[1],)),
    ]))


def round_trip(cases, implementation, tmp_path, **export_options):
    """{name: (jitted output, the deserialized program's output in a fresh process)}."""
    exported, wants = {}, {}
    for name, (fn, args) in cases.items():
        exp = jax.export.export(jax.jit(fn), **export_options)(*args)
        exported[name] = (exp.serialize(), jax.tree.map(np.asarray, args))
        wants[name] = jax.tree.map(np.asarray, jax.jit(fn)(*args))
    programs_file, outputs_file = tmp_path / "programs.pkl", tmp_path / "outputs.pkl"
    programs_file.write_bytes(pickle.dumps(exported))
    # The child imports the same w4afp8_jax as this process.
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(w4.__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([package_root, os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-c", CHILD, str(programs_file), str(outputs_file), implementation],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"the loading process failed:\n{run.stderr[-4000:]}"
    gots = pickle.loads(outputs_file.read_bytes())
    return {name: (wants[name], gots[name]) for name in cases}


def assert_bitwise_equal(want, got):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        assert (a.dtype, a.shape) == (b.dtype, b.shape)
        assert a.tobytes() == b.tobytes(), f"{np.count_nonzero(a != b)} of {a.size} elements differ"


@pytest.fixture(scope="module")
def reference_round_trip(module_rng, tmp_path_factory):
    return round_trip(programs(module_rng[1], "reference"), "reference", tmp_path_factory.mktemp("export"))


@pytest.mark.parametrize("form", FORMS)
def test_reference_path_round_trip_is_bitwise(reference_round_trip, form):
    want, got = reference_round_trip[form]
    assert np.any(np.asarray(jax.tree.leaves(want)[-1], np.float32) != 0)
    assert_bitwise_equal(want, got)


def test_disabled_checks_name_every_custom_call_of_the_cuda_path(rng, monkeypatch):
    """Lowering for CUDA needs no GPU: the CUDA path is forced (as test_validation does) and the
    whole pipeline, router included, exported for platforms=["cuda"]."""
    if _backend._w4afp8_cuda is None:
        pytest.skip(f"needs the CUDA module: {_backend._module_status()}")
    monkeypatch.setattr(_backend, "resolve", lambda implementation: "cuda")
    w13 = w4.W4Weights(*int4_weights(rng, 16, 2 * I, H)).prepare()
    w2 = w4.W4Weights(*int4_weights(rng, 16, H, I)).prepare()
    x = rng.standard_normal((M, H)).astype(jnp.bfloat16)
    logits = rng.standard_normal((M, 16)).astype(np.float32)

    def layer(x, logits, w13, w2):
        topk_weights, topk_ids = w4.deepseek_topk(logits)
        return w4.moe(x, topk_ids, topk_weights, w13, w2)

    export = lambda **options: jax.export.export(jax.jit(layer), platforms=["cuda"], **options)(x, logits, w13, w2)
    with pytest.raises(ValueError, match="custom calls whose targets have no compatibility guarantees"):
        export()
    checks = w4.export.disabled_checks()
    names = {check.is_custom_call() for check in checks}
    assert names == set(_backend._w4afp8_cuda.registrations())
    exp = export(disabled_checks=checks)
    assert set(re.findall(r"stablehlo\.custom_call @(\w+)", exp.mlir_module())) == names
    assert jax.export.deserialize(exp.serialize()).platforms == ("cuda",)


@pytest.mark.gpu
def test_cuda_path_round_trip_is_bitwise(rng, tmp_path):
    cases = programs(rng, "cuda")
    for name, (want, got) in round_trip(cases, "cuda", tmp_path, disabled_checks=w4.export.disabled_checks()).items():
        try:
            assert_bitwise_equal(want, got)
        except AssertionError as error:
            raise AssertionError(f"{name}: {error}") from None
