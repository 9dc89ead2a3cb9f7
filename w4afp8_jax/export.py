"""`jax.export` support: the library's pytrees serialize, and the CUDA path's custom calls are
named for `jax.export.export(..., disabled_checks=...)`.

Importing w4afp8_jax imports this module, which registers `W4Weights`, `MoEExperts` and `Routing`
with `jax.export`, so an exported function may take or return them (serialization needs the
`flatbuffers` package). A program exported from the CUDA path holds custom calls to the library's
FFI targets: `disabled_checks()` lets `jax.export.export` accept them, and a process that calls
the deserialized program must first register the targets with `register_cuda_targets()`.
"""

from __future__ import annotations

import json

import jax

from . import _backend
from .checkpoint import MoEExperts
from .ops.route import Routing
from .weights import W4Weights


def _static_fields_to_json(aux) -> bytes:
    # A registered dataclass's auxdata is the tuple of its static fields (ints, strings, tuples of
    # ints); every one must round-trip, or a deserialized program rebuilds the class with
    # defaults in their place.
    return json.dumps(aux, default=int).encode()  # default: numpy integers (group_size may be one)


def _static_fields_from_json(data: bytes):
    as_tuples = lambda v: tuple(as_tuples(x) for x in v) if isinstance(v, list) else v
    return as_tuples(json.loads(data))


def _register_dataclass(cls) -> None:
    # The serialized name is part of the exported format: never rename it.
    jax.export.register_pytree_node_serialization(
        cls, serialized_name=f"w4afp8_jax.{cls.__name__}", serialize_auxdata=_static_fields_to_json,
        deserialize_auxdata=_static_fields_from_json)


_register_dataclass(W4Weights)
_register_dataclass(MoEExperts)
jax.export.register_namedtuple_serialization(Routing, serialized_name="w4afp8_jax.Routing")


def disabled_checks() -> list[jax.export.DisabledSafetyCheck]:
    """The safety checks to disable for exporting the CUDA path: one
    `jax.export.DisabledSafetyCheck.custom_call` per FFI target of the library (jax.export
    refuses custom calls outside its allowlist). Pass them as
    `jax.export.export(jax.jit(f), disabled_checks=w4afp8_jax.export.disabled_checks())`; the
    reference path needs none."""
    return [jax.export.DisabledSafetyCheck.custom_call(_backend.TARGET_PREFIX + op)
            for op in sorted(_backend.python_ops())]


def register_cuda_targets() -> None:
    """Registers the library's FFI targets with XLA in this process, which a process calling a
    deserialized program exported from the CUDA path needs before its first call (the library's
    own functions register them when they resolve the CUDA path). Needs the CUDA module, not a
    GPU, and initializes no JAX backend (safe before `jax.distributed.initialize`). Raises
    RuntimeError, saying why, when the CUDA module is not built or does not match this source."""
    reason = _backend._module_status()
    if reason is not None:
        raise RuntimeError(f"cannot register the CUDA targets: {reason}")
    _backend._register_targets()
