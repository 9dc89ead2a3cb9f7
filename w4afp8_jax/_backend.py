"""Finds the compiled CUDA module, registers its FFI targets, resolves `implementation`, and
exports the kernels' sizes and limits to Python.

One list of ops, ffi_cuda/ops.def, names every op's CUDA files, FFI handler and target
(`w4afp8_<op>`); on the Python side each op is the module w4afp8_jax/ops/<op>.py, and
registration checks that the two sets are equal.
"""

from __future__ import annotations

import functools
import importlib.machinery
import os
import pkgutil
import re
import shutil
import warnings
from typing import NamedTuple

import jax

IMPLEMENTATIONS = ("auto", "cuda", "reference")

try:
    from . import _w4afp8_cuda  # built by CMake when nvcc was found
    _IMPORT_ERROR = None
except ImportError as err:  # no nvcc at install time, or a source checkout without a build
    _w4afp8_cuda = None
    _IMPORT_ERROR = err


class Limits(NamedTuple):
    """Sizes and limits of the CUDA kernels (ffi_cuda/kernel_limits.h)."""

    max_experts: int      # experts per layer the kernels accept
    group_size: int       # input channels per weight scale
    row_alignment: int    # a weight matrix's N must be a multiple of this


# The documented values, used only when the CUDA module is absent (the reference path needs
# the same expert limit); with the module built, its own numbers are the truth.
_DOCUMENTED_LIMITS = Limits(max_experts=1024, group_size=128, row_alignment=16)


class GemmConfig(NamedTuple):
    """One grouped-GEMM kernel configuration (ffi_cuda/grouped_gemm/configs.h)."""

    name: str          # e.g. "stream_32x8": family, weight rows x tokens per work unit
    family: str        # kernel family: "register", "stream", "wgmma" or "tma"
    exact: bool        # computes the exact f32 sum of every K group
    rows: int          # weight rows per work unit
    tokens: int        # tokens per work unit


@functools.cache
def limits() -> Limits:
    if _w4afp8_cuda is None:
        return _DOCUMENTED_LIMITS
    return Limits(**_w4afp8_cuda.limits())


@functools.cache
def grouped_gemm_configs() -> tuple[GemmConfig, ...]:
    """The grouped GEMM's kernel configurations, by name (empty without the CUDA module)."""
    if _w4afp8_cuda is None:
        return ()
    return tuple(GemmConfig(**c) for c in _w4afp8_cuda.grouped_gemm_configs())


def grouped_gemm_default_config(rows: int, n: int, k: int, experts: int, *, precision=None) -> str | None:
    """The name of the configuration the CUDA path's heuristic picks for lhs [rows, k] and
    weights [experts, n, k / 2] at this precision (the routing never matters), or None without
    the CUDA module."""
    if _w4afp8_cuda is None:
        return None
    from .ops.grouped_gemm import is_exact
    return _w4afp8_cuda.grouped_gemm_default_config(rows, n, k, experts, is_exact(precision))


def check_gemm_config(arg: str, name: str, *, exact: bool) -> None:
    by_name = {c.name: c for c in grouped_gemm_configs()}
    if name not in by_name:
        raise ValueError(f"{arg} must name a configuration from grouped_gemm_configs() "
                         f"({', '.join(by_name)}), got {name!r}")
    if exact and not by_name[name].exact:
        raise ValueError(f"{arg}={name!r} is not exact (fp8 tensor-core accumulation) but precision asks "
                         "for the exact f32 group sums; pass precision=jax.lax.Precision.DEFAULT to use it")


def route_workspace_elements(num_slots: int, num_experts: int) -> int:
    """int32 elements of the routing kernels' scratch output (ffi_cuda/route.h)."""
    return _w4afp8_cuda.route_workspace_elements(num_slots, num_experts)


_PACKAGE = os.path.dirname(os.path.abspath(__file__))


def _gpu_count() -> int:
    try:
        return len(jax.devices("gpu"))
    except RuntimeError:  # no GPU backend at all
        return 0


def _module_status() -> str | None:
    """None when the CUDA module imported, else why not: a build that does not import, a
    source tree without a build, or an install that built none."""
    if _w4afp8_cuda is not None:
        return None
    built = sorted(name for name in os.listdir(_PACKAGE) if name.startswith("_w4afp8_cuda.")
                   and name.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES)))
    if built:
        return (f"the CUDA module {os.path.join(_PACKAGE, built[0])} was built but does not import "
                f"({_IMPORT_ERROR}): reinstall with nvcc on the PATH to rebuild it for this Python and JAX")
    if os.path.isdir(os.path.join(_PACKAGE, os.pardir, "ffi_cuda")):  # a source checkout
        return (f"the CUDA module is not importable: w4afp8_jax is imported from the source tree ({_PACKAGE}), "
                "which holds no compiled module: run from another directory to import the installed package "
                "(plain `pytest`, not `python -m pytest`, in the checkout), or copy a build's _w4afp8_cuda*.so "
                "next to it")
    # The install's CMake step skips the module (with a warning) exactly when it finds no nvcc.
    nvcc_now = "nvcc is on the PATH now" if shutil.which("nvcc") else "there is no nvcc on the PATH now either"
    return (f"the CUDA module is not built: nvcc was not found when the package was built (`pip install .`; "
            f"{_PACKAGE} has no _w4afp8_cuda*.so, and {nvcc_now}): reinstall with nvcc, CUDA 12.8+, on the PATH")


def cuda_unavailable_reason() -> str | None:
    """None when the CUDA path can run (the CUDA module is built and imports, and JAX sees a
    GPU), else one line saying both: whether the module is built (and if not, why: no nvcc at
    install time, a source tree without a build, or the import error) and whether JAX sees a
    GPU, e.g. "the CUDA module is built (.../_w4afp8_cuda....so); JAX sees no GPU (backend:
    cpu)"."""
    problem = _module_status()
    gpus = _gpu_count()
    if problem is None and gpus:
        return None
    module = problem or f"the CUDA module is built ({_w4afp8_cuda.__file__})"
    gpu = (f"JAX sees {gpus} GPU{'s' if gpus > 1 else ''}" if gpus else
           f"JAX sees no GPU (backend: {jax.default_backend()})")
    return f"{module}; {gpu}"


TARGET_PREFIX = "w4afp8_"


def python_ops() -> set[str]:
    """The ops with a Python module (w4afp8_jax/ops/<op>.py)."""
    from . import ops
    return {m.name for m in pkgutil.iter_modules(ops.__path__)}


@functools.cache
def _register_targets() -> None:
    targets = _w4afp8_cuda.registrations()
    cuda_ops = {name.removeprefix(TARGET_PREFIX) for name in targets}
    if cuda_ops != python_ops():
        raise RuntimeError(f"the CUDA module's ops {sorted(cuda_ops)} differ from the Python ops "
                           f"{sorted(python_ops())}: rebuild the module from this source tree")
    for name, capsule in targets.items():
        jax.ffi.register_ffi_target(name, capsule, platform="CUDA")


def ffi_call(op: str, result_shape_dtypes, **kwargs):
    """jax.ffi.ffi_call of the op's target (targets are registered by `resolve`)."""
    return jax.ffi.ffi_call(TARGET_PREFIX + op, result_shape_dtypes, vmap_method="sequential", **kwargs)


def resolve(implementation: str) -> str:
    """The path an `implementation=` argument takes ("cuda" or "reference"; public as
    `w4afp8_jax.resolve_implementation`): "auto" is "cuda" when the module is built and JAX
    sees a GPU, else "reference". Raises ValueError for another name and RuntimeError (saying
    why, as `cuda_unavailable_reason`) for "cuda" when it cannot run."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    if implementation == "reference":
        return "reference"
    reason = cuda_unavailable_reason()
    if reason is None:
        _register_targets()
        return "cuda"
    if implementation == "cuda":
        raise RuntimeError(f'implementation="cuda" is not available: {reason}')
    return "reference"


# The first jaxlib whose XLA turns dynamic-slice fusion on by default (openxla/xla PR #43831;
# read off the `.debug_options` dumps of jaxlib 0.10.2, 0.11.0, 0.11.1, 0.11.2 and 0.12.1): from
# it on, a layer sliced from stacked weights inside a loop (lax.scan over them as xs, fori_loop,
# vmap, nnx.scan) reaches a custom call as a pointer into the stack instead of a copy.
SLICE_FUSION_JAXLIB = (0, 11, 1)


def weight_slices_copied(xla_flags: str | None = None, jaxlib_version: str | None = None) -> str | None:
    """Why XLA would copy a slice of stacked weights before a custom call reads it (a jaxlib
    older than 0.11.1, or XLA_FLAGS turning --xla_gpu_enable_dynamic_slice_fusion off), or None."""
    import jaxlib
    flags = os.environ.get("XLA_FLAGS", "") if xla_flags is None else xla_flags
    setting = None
    for flag in flags.split():  # XLA: the last setting wins, a bare flag means true
        name, _, value = flag.lstrip("-").partition("=")
        if name == "xla_gpu_enable_dynamic_slice_fusion":
            setting = value.lower() not in ("false", "0")
    if setting is False:
        return "XLA_FLAGS sets --xla_gpu_enable_dynamic_slice_fusion=false"
    version = jaxlib.__version__ if jaxlib_version is None else jaxlib_version
    if setting is None and tuple(int(p) for p in re.findall(r"\d+", version)[:3]) < SLICE_FUSION_JAXLIB:
        return f"jaxlib {version} leaves XLA's dynamic-slice fusion off (on by default from 0.11.1)"
    return None


@functools.cache
def warn_if_weight_slices_copied() -> None:
    """Once per process, where `weight_slices_copied` gives a reason: traced weights that are
    slices of a stack would be copied layer by layer before every kernel reads them (a scan over
    stacked weights then runs ~15x slower, docs/performance.md); the fix is W4Weights.layer(i).
    Whether traced weights are such a slice cannot be seen at trace time, hence the condition."""
    reason = weight_slices_copied()
    if reason:
        warnings.warn(f"{reason}: if these weights are slices of a stack (lax.scan over the stacked weights as "
                      "xs, fori_loop, vmap or nnx.scan over the layer axis), XLA copies each layer's weights "
                      "before the kernels read them; pass w.layer(i) instead, or use jaxlib >= 0.11.1",
                      stacklevel=4)
