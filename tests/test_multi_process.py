"""The multi-GPU layers under `jax.distributed` with several processes, as on several hosts: two
processes of 4 CPU devices each on this machine (cross-process collectives over gloo) run
`moe_expert_parallel` and `moe_tensor_parallel` on one mesh of all 8 devices, and their
outputs are checked against one process computing `moe` on one device (the reference path),
with the bounds of the single-process multi-device tests (tests/parallel_checks.py).

Inputs are placed as a multi-host program places them: each process passes its own rows of a
token-sharded batch (`jax.make_array_from_process_local_data`) or the whole batch when the tokens
are replicated, and builds only its devices' blocks of the weights (`make_array_from_callback`);
one case closes over host (NumPy) arrays, the same on every process, which the layers place
themselves. Every case runs under jax.jit, as a deployment would.
The cases cover both dispatches of the expert-parallel layer and both token placements of the
tensor-parallel one, with static and dynamic scales (dynamic ones are maxima over all devices of
both processes).

Run as a script, this file is one worker process: test_multi_process.py PORT PROCESS_ID SEED OUT.
"""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import w4afp8_jax as w4
from helpers import int4_weights, routed_tokens
from parallel_checks import assert_expert_parallel_close, assert_tensor_parallel_close

PROCESSES, LOCAL_DEVICES = 2, 4
SIZE = PROCESSES * LOCAL_DEVICES
E, H, I, M, K = 16, 128, 1024, 16, 4  # I / 8 = 128: one scale group per tensor-parallel slice
RSF = 2.5
STATIC = dict(a1_scale=0.02, a2_scale=0.01)
# (name, layer, options, static scales, how the inputs are placed): together every collective
# the layers use (all_to_all, all_gather, psum, psum_scatter, pmax of dynamic scales).
CASES = [
    ("ep_all_to_all_dynamic", "ep", dict(dispatch="all_to_all"), False, "global"),
    ("ep_all_gather_replicated_tokens_static", "ep", dict(dispatch="all_gather", token_sharded=False), True,
     "global"),
    ("tp_sharded_tokens_dynamic", "tp", dict(token_sharded=True), False, "global"),
    ("tp_replicated_tokens_host_arrays_static", "tp", dict(token_sharded=False), True, "host"),
]
GLOO_UNAVAILABLE = "GLOO UNAVAILABLE:"  # what a worker prints when this jax has no gloo collectives
TIMEOUT_S = 240


def problem(seed):
    """The one-device problem (NumPy): tokens, routing and full weights; both workers and the
    test build it from the same seed."""
    rng = np.random.default_rng(seed)
    w13 = w4.W4Weights(*int4_weights(rng, E, 2 * I, H)).prepare()
    w2 = w4.W4Weights(*int4_weights(rng, E, H, I))
    return (*routed_tokens(rng, M, H, E, K), w13, w2)


def scales_of(static):
    return STATIC if static else dict(a1_scale=None, a2_scale=None)  # None: dynamic scales


def layer_call(name, mesh):
    """The case's layer as a function of (x, ids, tw, w13, w2) on the reference path."""
    _, kind, options, static, _ = next(case for case in CASES if case[0] == name)
    layer = w4.moe_expert_parallel if kind == "ep" else w4.moe_tensor_parallel
    return lambda *args: layer(*args, mesh=mesh, axis_name="devices", routed_scaling_factor=RSF,
                               implementation="reference", **options, **scales_of(static))


def worker(port, process_id, seed, out):
    """One process: joins the others, runs every case, and process 0 saves the outputs."""
    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except Exception as error:  # a jax without the option
        print(GLOO_UNAVAILABLE, error, flush=True)
        sys.exit(3)
    jax.config.update("jax_num_cpu_devices", LOCAL_DEVICES)
    jax.config.update("jax_default_matmul_precision", "highest")  # as conftest sets it for the test
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=PROCESSES,
                               process_id=process_id, initialization_timeout=TIMEOUT_S // 2)
    try:
        devices = jax.devices()
    except RuntimeError as error:
        if "gloo" not in str(error).lower():
            raise
        print(GLOO_UNAVAILABLE, error, flush=True)
        sys.exit(3)
    from jax.experimental import multihost_utils
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    assert len(devices) == SIZE and jax.local_device_count() == LOCAL_DEVICES
    mesh = Mesh(np.array(devices), ("devices",))
    x, ids, tw, w13, w2 = problem(seed)
    tp13, tp2 = w4.shard_tensor_parallel(w13, w2, SIZE)
    first, last = process_id * M // PROCESSES, (process_id + 1) * M // PROCESSES

    def weights(w, axis):  # this process's devices' blocks only, sharded along axis -axis
        def place(a):
            sharding = NamedSharding(mesh, PartitionSpec(*[None] * (a.ndim - axis), "devices"))
            return jax.make_array_from_callback(a.shape, sharding, lambda index: a[index])
        return jax.tree.map(place, w)

    def tokens(a, sharded):  # this process's rows of a sharded batch, or the whole batch
        sharding = NamedSharding(mesh, PartitionSpec("devices") if sharded else PartitionSpec())
        return jax.make_array_from_process_local_data(sharding, a[first:last] if sharded else a)

    outputs = {}
    for name, kind, options, _, placement in CASES:
        ws = (w13, w2) if kind == "ep" else (tp13, tp2)
        if placement == "host":
            # Closed over: the layer places host arrays itself (eager works too, but runs the
            # shard_map op by op: 10 s of CPU here).
            result = jax.jit(lambda: layer_call(name, mesh)(x, ids, tw, *ws))()
        else:
            sharded = options.get("token_sharded", kind == "ep")
            axis = 3 if kind == "ep" else 2  # experts, or rows
            args = (*(tokens(a, sharded) for a in (x, ids, tw)), *(weights(w, axis) for w in ws))
            result = jax.jit(layer_call(name, mesh))(*args)
        outputs[name] = np.asarray(multihost_utils.process_allgather(result, tiled=True).astype(jnp.float32))
    if process_id == 0:
        np.savez(out, **outputs)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def multi_process_outputs(module_rng, tmp_path_factory):
    """(seed, the problem, {case: the two processes' output, f32 [M, H]} from one run of the
    workers, {static scales: the one-device output, f32 [M, H]})."""
    seed = int(module_rng[1].integers(2**31))
    out = tmp_path_factory.mktemp("multi_process") / "outputs.npz"
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(w4.__file__)))
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    # Each worker sets its own device count: drop the 8 host devices conftest asks for.
    flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                     if not f.startswith("--xla_force_host_platform_device_count"))
    env = {**os.environ, "XLA_FLAGS": flags,
           "PYTHONPATH": os.pathsep.join([package_root, tests_dir, os.environ.get("PYTHONPATH", "")])}
    port = free_port()
    workers = [subprocess.Popen([sys.executable, __file__, str(port), str(i), str(seed), str(out)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for i in range(PROCESSES)]
    try:
        logs = [process.communicate(timeout=TIMEOUT_S)[0] for process in workers]
    except subprocess.TimeoutExpired:  # e.g. a worker left waiting for a peer that failed
        for process in workers:
            process.kill()
        logs = [process.communicate()[0] for process in workers]
        pytest.fail(f"the workers ran past {TIMEOUT_S} s:\n" + "\n".join(log[-3000:] for log in logs))
    for log in logs:
        if GLOO_UNAVAILABLE in log:
            pytest.skip("this jax has no gloo CPU collectives: " + log.partition(GLOO_UNAVAILABLE)[2].strip()[:500])
    for i, (process, log) in enumerate(zip(workers, logs)):
        assert process.returncode == 0, f"process {i} exited with {process.returncode}:\n{log[-4000:]}"
    with np.load(out) as outputs:
        outputs = dict(outputs)
    args = problem(seed)
    one_device = lambda static: jax.jit(lambda *a: w4.moe(*a, routed_scaling_factor=RSF, implementation="reference",
                                                          **scales_of(static)))  # jit: 3x faster than eager here
    wants = {static: np.asarray(one_device(static)(*args).astype(jnp.float32)) for static in (False, True)}
    return seed, args, outputs, wants


@pytest.mark.parametrize("name", [case[0] for case in CASES])
def test_several_processes_equal_one_device(multi_process_outputs, name):
    seed, (x, ids, tw, w13, w2), outputs, wants = multi_process_outputs
    print(f"workers' seed={seed}")
    _, kind, _, static, _ = next(case for case in CASES if case[0] == name)
    got, want = outputs[name], wants[static]
    assert got.shape == (M, H)
    if kind == "ep":
        assert_expert_parallel_close(got, want)
    else:
        assert_tensor_parallel_close(got, want, x, ids, tw, w13, w2, SIZE, routed_scaling_factor=RSF,
                                     implementation="reference", **scales_of(static))


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
