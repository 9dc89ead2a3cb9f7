"""cuda_unavailable_reason says both whether the CUDA module is built (and if not, why) and
whether JAX sees a GPU; every combination is staged by monkeypatching the module, the package
directory and jax.devices, so these run on any machine."""

import importlib.machinery
import shutil
import types

import jax
import pytest

import w4afp8_jax as w4
from w4afp8_jax import _backend

SO_NAME = "_w4afp8_cuda" + importlib.machinery.EXTENSION_SUFFIXES[0]


@pytest.fixture
def stage(monkeypatch, tmp_path):
    """stage(module=..., gpus=..., files=..., source_tree=..., nvcc=...): the CUDA module
    imported (True) or failing with an ImportError (False), JAX's GPU count, whether the package
    directory holds a built module file and sits in a source tree, and whether nvcc is on the
    PATH now. Returns the package directory."""
    package = tmp_path / "site-packages" / "w4afp8_jax"

    def apply(*, module, gpus, files=False, source_tree=False, nvcc=False):
        package.mkdir(parents=True)
        if files:
            (package / SO_NAME).write_bytes(b"")
        if source_tree:
            (package.parent / "ffi_cuda").mkdir()
        monkeypatch.setattr(_backend, "_PACKAGE", str(package))
        if module:
            fake = types.ModuleType("w4afp8_jax._w4afp8_cuda")
            fake.__file__ = str(package / SO_NAME)
            monkeypatch.setattr(_backend, "_w4afp8_cuda", fake)
            monkeypatch.setattr(_backend, "_IMPORT_ERROR", None)
        else:
            monkeypatch.setattr(_backend, "_w4afp8_cuda", None)
            monkeypatch.setattr(_backend, "_IMPORT_ERROR", ImportError("libcudart.so.13: cannot open shared object"))
        real_devices = jax.devices

        def devices(backend=None):
            if backend != "gpu":
                return real_devices(backend)
            if not gpus:
                raise RuntimeError("Unknown backend: 'gpu' requested, but no platforms that are instances of gpu "
                                   "are present")
            return [object()] * gpus

        monkeypatch.setattr(jax, "devices", devices)
        monkeypatch.setattr(shutil, "which", lambda name: "/usr/local/cuda/bin/nvcc" if nvcc else None)
        return package

    return apply


def test_built_module_without_a_gpu_says_both(stage):
    package = stage(module=True, gpus=0)
    reason = w4.cuda_unavailable_reason()
    assert reason == f"the CUDA module is built ({package / SO_NAME}); JAX sees no GPU (backend: {jax.default_backend()})"
    assert _backend.resolve("auto") == "reference"
    with pytest.raises(RuntimeError, match='implementation="cuda" is not available') as info:
        _backend.resolve("cuda")
    assert reason in str(info.value)


def test_built_module_with_a_gpu_is_available(stage):
    stage(module=True, gpus=2)
    assert w4.cuda_unavailable_reason() is None


@pytest.mark.parametrize("nvcc", [False, True])
def test_install_without_nvcc_says_not_built(stage, nvcc):
    package = stage(module=False, gpus=1, nvcc=nvcc)
    reason = w4.cuda_unavailable_reason()
    assert reason.startswith("the CUDA module is not built: nvcc was not found when the package was built")
    assert f"{package} has no _w4afp8_cuda*.so" in reason
    assert ("nvcc is on the PATH now" if nvcc else "there is no nvcc on the PATH now either") in reason
    assert reason.endswith("reinstall with nvcc, CUDA 12.8+, on the PATH; JAX sees 1 GPU")
    with pytest.raises(RuntimeError, match="the CUDA module is not built"):
        _backend.resolve("cuda")


def test_built_module_that_fails_to_import_says_why(stage):
    package = stage(module=False, gpus=0, files=True, source_tree=True)
    reason = w4.cuda_unavailable_reason()
    assert reason.startswith(f"the CUDA module {package / SO_NAME} was built but does not import "
                             "(libcudart.so.13: cannot open shared object)")
    assert reason.endswith(f"; JAX sees no GPU (backend: {jax.default_backend()})")


def test_source_tree_without_a_build(stage):
    package = stage(module=False, gpus=4, source_tree=True)
    reason = w4.cuda_unavailable_reason()
    assert reason.startswith(f"the CUDA module is not importable: w4afp8_jax is imported from the source tree "
                             f"({package})")
    assert reason.endswith("; JAX sees 4 GPUs")


# ---------------------------------------------------------------------------------------------
# The warning for programs that would copy sliced weights (issue 26)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flags,version,copies", [
    ("", "0.10.2", True), ("", "0.11.0", True), ("", "0.11.1", False), ("", "0.12.1", False),
    ("--xla_gpu_enable_dynamic_slice_fusion=false", "0.11.2", True),
    ("--xla_gpu_enable_dynamic_slice_fusion=true", "0.10.2", False),
    ("--xla_gpu_enable_dynamic_slice_fusion", "0.10.2", False),  # a bare flag is true
    ("--xla_gpu_enable_dynamic_slice_fusion=false --xla_gpu_enable_dynamic_slice_fusion=true", "0.11.2", False),
])
def test_weight_slices_copied(flags, version, copies):
    reason = _backend.weight_slices_copied(flags, version)
    assert (reason is not None) == copies, reason


def test_cuda_path_warns_once_where_sliced_weights_are_copied(rng, monkeypatch):
    """Lowering for CUDA needs no GPU (the CUDA path forced, as test_export does): traced weights
    that are not a layer() view warn once per process where XLA would copy slices; a view or a
    jaxlib with the fusion never warns."""
    import warnings

    import numpy as np
    from helpers import int4_weights
    if _backend._w4afp8_cuda is None:
        pytest.skip(f"needs the CUDA module: {_backend._module_status()}")
    monkeypatch.setattr(_backend, "resolve", lambda implementation: "cuda")
    stack = w4.W4Weights(*(jax.numpy.asarray(np.stack([a, a])) for a in int4_weights(rng, 4, 32, 256)))
    lhs, scale = w4.quantize_fp8(rng.standard_normal((6, 256)).astype(np.float32))
    offsets = np.array([0, 2, 2, 5, 6], np.int32)

    def lower(weights_of, copied):
        _backend.warn_if_weight_slices_copied.cache_clear()
        monkeypatch.setattr(_backend, "weight_slices_copied", lambda: copied)
        body = lambda c, i: (c, w4.grouped_gemm(lhs, scale, weights_of(i), offsets))  # noqa: E731
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(2):  # twice: the warning comes once
                jax.jit(lambda: jax.lax.scan(body, 0, np.arange(2))[1]).trace().lower(lowering_platforms=("cuda",))
        return [str(w.message) for w in caught if "layer(i)" in str(w.message)]

    sliced = lambda i: jax.tree.map(lambda a: a[i], stack)  # noqa: E731
    assert len(lower(sliced, "jaxlib 0.10.2 leaves XLA's dynamic-slice fusion off")) == 1
    assert lower(sliced, None) == []
    assert lower(stack.layer, "jaxlib 0.10.2 leaves XLA's dynamic-slice fusion off") == []
