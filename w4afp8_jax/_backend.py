"""Finds the compiled CUDA module, registers its FFI targets and resolves `implementation`."""

from __future__ import annotations

import functools

import jax

IMPLEMENTATIONS = ("auto", "cuda", "reference")

try:
    from . import _w4afp8_cuda  # built by CMake when nvcc was found
    _IMPORT_ERROR = None
except ImportError as err:  # no nvcc at install time, or a source checkout without a build
    _w4afp8_cuda = None
    _IMPORT_ERROR = err


def _gpu_present() -> bool:
    try:
        return len(jax.devices("gpu")) > 0
    except RuntimeError:
        return False


def cuda_unavailable_reason() -> str | None:
    """None when the CUDA path can run, else a sentence saying why not."""
    if _w4afp8_cuda is None:
        return (f"the compiled module w4afp8_jax._w4afp8_cuda is missing ({_IMPORT_ERROR}); "
                "reinstall with nvcc on the PATH to build it")
    if not _gpu_present():
        return f"JAX sees no GPU (backend: {jax.default_backend()})"
    return None


@functools.cache
def _register_targets() -> None:
    for name, capsule in _w4afp8_cuda.registrations().items():
        jax.ffi.register_ffi_target(name, capsule, platform="CUDA")


def resolve(implementation: str) -> str:
    """Maps "auto" to "cuda" when the module is built and a GPU is present, else "reference"."""
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
