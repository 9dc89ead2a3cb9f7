#!/usr/bin/env bash
# One call on the device machine: build the CUDA module for its Python, run the GPU tests,
# then whatever benchmarks are asked for. Logs and JSON go to $OUT.
#   usage: bash scripts/device_check.sh [pytest args...]
#   BENCH="gemm moe prep"  also run those benchmarks (JSON and PNG under $OUT)
#   SANITIZE=1             also run compute-sanitizer memcheck over each GPU test file (own
#                          process each, cudaMalloc per buffer so out-of-bounds accesses are
#                          visible) and racecheck over the grouped-GEMM tile configurations
set -uo pipefail
OUT=${OUT:-/tmp/w4afp8_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
python3 -c "import jax; print('jax', jax.__version__, jax.devices())" | tee -a "$OUT/gpu.txt"

start=$(date +%s)
cmake -S . -B build/device -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE="$(command -v python3)" >"$OUT/build.log" 2>&1 &&
  cmake --build build/device -j16 >>"$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
cp build/device/_w4afp8_cuda*.so w4afp8_jax/
echo "build: $(( $(date +%s) - start )) s"

# Test paths among the arguments narrow the run; otherwise the whole suite's GPU tests run.
paths=()
for arg in "$@"; do [ -e "$arg" ] && paths+=("$arg"); done
[ ${#paths[@]} -gt 0 ] || set -- "$@" tests
python3 -m pytest -q -m gpu -rs "$@" 2>&1 | tee "$OUT/pytest_gpu.log"
status=${PIPESTATUS[0]}

if [ -n "${SANITIZE:-}" ]; then
  # Under the sanitizers kernels run 10-100x slower: the largest cases are left out and every
  # run has its own time limit (SANITIZE_LIMIT seconds), so one call stays within 10 minutes.
  limit=${SANITIZE_LIMIT:-100}
  small="not 65536 and not uniform256 and not 4096 and not 300 and not 2048 and not random64"
  for f in tests/test_{route,gather_quantize,grouped_gemm,silu_mul_quantize,combine,moe}.py; do
    name=$(basename "$f" .py)
    selection=$small
    # The GEMM file: every tile configuration once, the bad-offset and bad-input cases.
    [ "$name" = test_grouped_gemm ] && selection="(every_tile and tiled) or out_of_range or bad_input or same_jit"
    XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_PYTHON_CLIENT_ALLOCATOR=platform timeout "$limit" \
      compute-sanitizer --tool memcheck --error-exitcode 9 python3 -m pytest -q -m gpu "$f" -k "$selection" \
      >"$OUT/memcheck_$name.log" 2>&1
    echo "memcheck $name: rc=$? $(grep -E 'ERROR SUMMARY' "$OUT/memcheck_$name.log" | tail -1)" \
      "$(grep -E '[0-9]+ (passed|failed)' "$OUT/memcheck_$name.log" | tail -1)"
  done
  XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_PYTHON_CLIENT_ALLOCATOR=platform timeout "$limit" \
    compute-sanitizer --tool racecheck --error-exitcode 9 python3 -m pytest -q -m gpu \
    tests/test_grouped_gemm.py -k "every_tile and tiled and (register_16x8_k4_s4 or register_128x32_k1_s2)" \
    >"$OUT/racecheck.log" 2>&1
  echo "racecheck grouped_gemm: rc=$? $(grep -E 'RACECHECK SUMMARY' "$OUT/racecheck.log" | tail -1)" \
    "$(grep -E '[0-9]+ (passed|failed)' "$OUT/racecheck.log" | tail -1)"
fi

for b in ${BENCH:-}; do
  python3 "benchmarks/bench_$b.py" --json "$OUT/bench_$b.json" 2>&1 | tee "$OUT/bench_$b.log"
done
exit "$status"
