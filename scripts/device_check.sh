#!/usr/bin/env bash
# One call on the device machine: build the CUDA module for its Python, run the GPU tests,
# then whatever benchmarks are asked for. Logs and JSON go to $OUT.
#   usage: bash scripts/device_check.sh [pytest args...]      (BENCH="gemm moe prep" to add benchmarks)
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

python3 -m pytest -q -m gpu -rs "$@" tests 2>&1 | tee "$OUT/pytest_gpu.log"
status=${PIPESTATUS[0]}

for b in ${BENCH:-}; do
  python3 "benchmarks/bench_$b.py" --json "$OUT/bench_$b.json" 2>&1 | tee "$OUT/bench_$b.log"
done
exit "$status"
