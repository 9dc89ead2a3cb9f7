#!/usr/bin/env bash
# GPU work on the device machine, in phases chosen to fit a lease. Logs and JSON go to $OUT.
#   usage: PHASES="tests sanitize ab bench multi" bash scripts/device_check.sh [pytest -k expression]
#   tests     the GPU tests of the whole suite (pytest -m gpu), in parallel processes
#   sanitize  compute-sanitizer memcheck over every GPU test file (small cases; the platform
#             allocator, so out-of-bounds accesses are visible) and racecheck/synccheck/initcheck
#             over selected kernels
#   ab        kernel-only times (Nsight Compute) of this build and of the build in .ab/old
#             (a package + module of an earlier commit, with its own benchmarks/), same problems
#   layer     the kernels of one decode layer (B = 1 and 20) with their kernel-only times
#   bench     bench_decode.py and bench_gemm.py (decode and prefill B), JSON and PNG
#   multi     the multi-GPU tests and bench_multi_gpu.py (needs 2+ GPUs)
# The CUDA module is built here when w4afp8_jax/ holds none (carry a build made for Python 3.12
# and jax 0.11.2 to skip that); the seed's library is read from .peers/sgl_w4a8 (carry it).
set -uo pipefail
OUT=${OUT:-/tmp/w4afp8_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 XLA_PYTHON_CLIENT_PREALLOCATE=false
PHASES=${PHASES:-tests}
KEXPR=${1:-}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
if ! ls w4afp8_jax/_w4afp8_cuda*.so >/dev/null 2>&1; then
  start=$(date +%s)
  cmake -S . -B build/device -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE="$(command -v python3)" >"$OUT/build.log" 2>&1 &&
    cmake --build build/device -j16 >>"$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
  cp build/device/_w4afp8_cuda*.so w4afp8_jax/
  echo "build: $(( $(date +%s) - start )) s"
fi
python3 -c "import jax, w4afp8_jax as w; print('jax', jax.__version__, jax.devices()); print('cuda:', w.cuda_unavailable_reason() or 'ok')" | tee -a "$OUT/gpu.txt"
status=0
run_phase() { [[ " $PHASES " == *" $1 "* ]]; }

if run_phase tests; then
  python3 -m pytest -q -m gpu -n 8 -p no:cacheprovider -rs ${KEXPR:+-k "$KEXPR"} tests 2>&1 | tee "$OUT/pytest_gpu.log" | tail -25
  status=${PIPESTATUS[0]}
fi

if run_phase sanitize; then
  # Under the sanitizers kernels run 10-100x slower: the largest cases are left out, the files
  # run in parallel, and every run has its own time limit (SANITIZE_LIMIT seconds).
  limit=${SANITIZE_LIMIT:-240}
  small="not 65536 and not uniform256 and not 4096 and not 300 and not 2048 and not random64 and not 8192"
  export XLA_PYTHON_CLIENT_ALLOCATOR=platform
  for f in tests/test_{route,gather_quantize,grouped_gemm,silu_mul_quantize,combine,moe,deepseek_topk,layer_view,edge_cases}.py; do
    [ -e "$f" ] || continue
    name=$(basename "$f" .py)
    selection=$small
    [ "$name" = test_grouped_gemm ] && selection="(every_tile and tiled) or out_of_range or bad_input or same_jit"
    timeout "$limit" compute-sanitizer --tool memcheck --error-exitcode 9 python3 -m pytest -q -m gpu -p no:cacheprovider \
      "$f" -k "$selection" >"$OUT/memcheck_$name.log" 2>&1 &
  done
  wait
  for f in "$OUT"/memcheck_*.log; do
    echo "$(basename "$f" .log): $(grep -E 'ERROR SUMMARY' "$f" | tail -1) $(grep -E '[0-9]+ (passed|failed)' "$f" | tail -1)"
  done
  for tool in racecheck synccheck initcheck; do
    timeout "$limit" compute-sanitizer --tool $tool --error-exitcode 9 python3 -m pytest -q -m gpu -p no:cacheprovider \
      tests/test_grouped_gemm.py tests/test_deepseek_topk.py \
      -k "(every_tile and tiled and (register_16x8_k4_s4 or stream_32x8_s6 or wgmma)) or (cuda_matches and 64-256)" \
      >"$OUT/${tool}.log" 2>&1 &
  done
  wait
  for tool in racecheck synccheck initcheck; do
    echo "$tool: $(grep -E 'SUMMARY' "$OUT/$tool.log" | tail -1) $(grep -E '[0-9]+ (passed|failed)' "$OUT/$tool.log" | tail -1)"
  done
  unset XLA_PYTHON_CLIENT_ALLOCATOR
fi

if run_phase ab; then
  ab_batches=${AB_BATCHES:-1,16,512,8192}
  ncu_run() {  # label, package root, configs
    ncu --clock-control none --kernel-name regex:GroupedGemm --metrics gpu__time_duration.sum --csv \
      env PYTHONPATH="$2" python3 "$2/benchmarks/ncu_gemm_tiles.py" launch --order "$OUT/ab_$1_order.json" \
      --configs "$3" --batches "$ab_batches" >"$OUT/ab_$1.csv" 2>"$OUT/ab_$1.err"
    PYTHONPATH="$2" python3 "$2/benchmarks/ncu_gemm_tiles.py" report --order "$OUT/ab_$1_order.json" \
      --csv "$OUT/ab_$1.csv" | tee "$OUT/ab_$1.txt"
  }
  [ -d .ab/old ] && [ "${AB_OLD_CONFIGS:-}" != none ] && ncu_run old .ab/old "${AB_OLD_CONFIGS:-1,10,6,15}"
  ncu_run new . "${AB_NEW_CONFIGS:-register_16x8_k4_s4,stream_32x8_s6,register_128x32_k1_s2,wgmma_128x128_s4}"
fi

if run_phase layer; then  # one decode layer's kernels, kernel-only times (Nsight Compute)
  for b in ${LAYER_TOKENS:-1 20}; do
    ncu --clock-control none --metrics gpu__time_duration.sum --csv \
      python3 benchmarks/ncu_layer.py launch --tokens "$b" >"$OUT/ncu_layer.csv" 2>/dev/null
    echo "layer B=$b:"; python3 benchmarks/ncu_layer.py report --csv "$OUT/ncu_layer.csv" | tee -a "$OUT/layer.txt"
  done
fi

if run_phase bench; then
  python3 benchmarks/bench_decode.py --json "$OUT/bench_decode.json" --png "$OUT/bench_decode.png" 2>&1 |
    tee "$OUT/bench_decode.log" | tail -40
  python3 benchmarks/bench_gemm.py --json "$OUT/bench_gemm.json" --png "$OUT/bench_gemm.png" 2>&1 |
    tee "$OUT/bench_gemm.log" | tail -40
fi

if run_phase multi; then
  python3 -m pytest -q -m gpu -p no:cacheprovider -rs tests/test_multi_gpu_gpu.py 2>&1 | tee "$OUT/pytest_multi.log" | tail -8
  python3 benchmarks/bench_multi_gpu.py --json "$OUT/bench_multi_gpu.json" 2>&1 | tee "$OUT/bench_multi_gpu.log" | tail -30
fi
exit "$status"
