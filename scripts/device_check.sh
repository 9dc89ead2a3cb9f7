#!/usr/bin/env bash
# GPU work on the device machine, in phases chosen to fit a lease. The files worth keeping go to
# $OUT (at most a handful: the device tool returns 8); scratch goes to $AUX. A summary of every
# phase is printed last.
#   usage: PHASES="tests sanitize example profile ab layer envab bench multi" bash scripts/device_check.sh [pytest -k expression]
#   tests     the GPU tests of the whole suite (pytest -m gpu), in parallel processes
#   sanitize  compute-sanitizer over GPU test files, SANITIZE_RUNS = "tool:test_file ..."
#             (default: memcheck, racecheck, synccheck and initcheck over every single-GPU
#             test file)
#   example   examples/deepseek_v3_decode.py (EXAMPLE_ARGS)
#   profile   Nsight Compute sections of the PROFILE_KERNELS kernels of one decode layer
#   ab        kernel-only times (Nsight Compute) of this build and of the build in .ab/old
#             (a package + module of an earlier commit, with its own benchmarks/)
#   layer     the kernels of one decode layer (B = 1 and 20) with their kernel-only times
#   envab     bench_decode.py once per variant in ENVAB (environment and arguments; default PDL off | on)
#   bench     bench_decode.py and bench_gemm.py (BENCH_GEMM_BATCHES), JSON and PNG; bench_decode
#             or bench_gemm runs one of them
#   multi     the multi-GPU tests and bench_multi_gpu.py (needs 2+ GPUs)
# Each phase has a time limit (PHASE_LIMIT seconds, default 300). The CUDA module is built here
# first; the seed's library is read from .peers/sgl_w4a8 (carry it).
set -uo pipefail
OUT=${OUT:-/tmp/w4afp8_out}
AUX=${AUX:-/tmp/w4afp8_aux}
mkdir -p "$OUT" "$AUX"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 XLA_PYTHON_CLIENT_PREALLOCATE=false
PHASES=${PHASES:-tests}
LIMIT=${PHASE_LIMIT:-300}
KEXPR=${1:-}
SUMMARY=$OUT/summary.txt  # written as the phases finish, so a run stopped early still returns it
: >"$SUMMARY"
note() { echo "$*" | tee -a "$SUMMARY"; }
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
note "$(nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader)"
# Always (re)built: a warm machine keeps the last call's build/ and .so, which may predate the
# sources this call carries (the build is incremental, so an unchanged tree costs seconds).
start=$(date +%s)
cmake -S . -B build/device -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE="$(command -v python3)" >"$AUX/build.log" 2>&1 &&
  cmake --build build/device -j16 >>"$AUX/build.log" 2>&1 || { tail -50 "$AUX/build.log"; exit 1; }
cp build/device/_w4afp8_cuda*.so w4afp8_jax/
note "build: $(( $(date +%s) - start )) s"
note "$(python3 -c "import jax, w4afp8_jax as w; print('jax', jax.__version__, jax.devices(), 'cuda:', w.cuda_unavailable_reason() or 'ok')")"
status=0
run_phase() { [[ " $PHASES " == *" $1 "* ]]; }

if run_phase tests; then
  timeout "$LIMIT" python3 -m pytest -q -m gpu -n 8 -p no:cacheprovider -rfEs ${KEXPR:+-k "$KEXPR"} tests \
    >"$OUT/pytest_gpu.log" 2>&1
  status=$?
  note "tests (rc $status): $(grep -E '^(FAILED|ERROR) ' "$OUT/pytest_gpu.log" | head -20)"
  note "$(tail -1 "$OUT/pytest_gpu.log")"
fi

if run_phase sanitize; then
  # One process per (tool, test file), SANITIZE_JOBS at a time (12 ran out of GPU memory), each
  # within PHASE_LIMIT. memcheck, racecheck and synccheck instrument only this library's kernels
  # (XLA's own are not ours to check and made the runs too slow); all run on the platform
  # allocator so an out-of-bounds access is not hidden inside a pooled block; no autotuning.
  export XLA_PYTHON_CLIENT_ALLOCATOR=platform XLA_FLAGS="--xla_gpu_autotune_level=0"
  # Our kernels' names all contain the namespace. initcheck instruments everything: a buffer
  # written by an uninstrumented XLA kernel counts as never written (every input our kernels
  # read from XLA was reported).
  filter=(--kernel-name kns=w4afp8)
  # application-only: the runs that ended without a summary (test_deepseek_topk, racecheck of
  # test_grouped_gemm) printed a second sanitizer banner first, i.e. the sanitizer had attached
  # to a child process. Unattached, a child cannot start CUDA under the sanitizer's environment,
  # so the tests that run a subprocess (command buffers) are left out; the kernels they launch
  # are checked by the other tests.
  rm -f "$AUX"/san_*.log "$OUT/sanitizers.log"  # a warm machine keeps $AUX
  note "sanitizer: $(compute-sanitizer --version | tail -1), filter: ${filter[*]}"
  # A run is tool:test_file (the file's GPU tests under pytest). Default: every tool over every
  # single-GPU test file, the longest first.
  files="test_grouped_gemm test_moe test_edge_cases test_route test_deepseek_topk test_gather_quantize
    test_silu_mul_quantize test_combine test_autodiff test_ragged_dot test_checkpoint test_layer_view"
  default_runs=$(for f in $files; do for t in memcheck racecheck synccheck initcheck; do echo "$t:$f"; done; done)
  phase_start=$(date +%s)
  # SANITIZE_ALONE files run with no other run beside them: three test_grouped_gemm runs at
  # once (with three small ones) ran out of the GPU's memory.
  alone=" ${SANITIZE_ALONE:-test_grouped_gemm} "
  for run in ${SANITIZE_RUNS:-$default_runs}; do
    target=${run#*:}
    limit_jobs=${SANITIZE_JOBS:-4}
    [[ $alone == *" $target "* ]] && limit_jobs=1
    while [ "$(jobs -rp | wc -l)" -ge "$limit_jobs" ]; do sleep 1; done
    # Each run ends by the phase's deadline (SANITIZE_TIME s after it starts); none starts with
    # less than a minute left.
    run_limit=$(( ${SANITIZE_TIME:-100000} - ($(date +%s) - phase_start) ))
    (( run_limit > LIMIT )) && run_limit=$LIMIT
    if (( run_limit < (LIMIT < 60 ? LIMIT : 60) )); then note "not started: $run"; continue; fi
    tool=${run%%:*}
    log=$AUX/san_${tool}_$target.log
    command=(python3 -m pytest -q -m gpu -p no:cacheprovider -rf "tests/$target.py"
      -k "not cuda_graphs and not command_buffers${SANITIZE_K:+ and ($SANITIZE_K)}")
    tool_filter=("${filter[@]}")
    # initcheck sees XLA's own kernels too: print every report (without backtraces) so the ones
    # in our kernels, if any, are counted rather than hidden behind the first 100.
    [ "$tool" = initcheck ] && tool_filter=(--print-limit 10000000 --show-backtrace no)
    # Each run reports as it ends, so a call stopped early still returns the finished ones.
    ( start=$(date +%s)
      timeout -k 5 "$run_limit" compute-sanitizer --tool "$tool" "${tool_filter[@]}" --target-processes application-only \
        --error-exitcode 9 "${command[@]}" >"$log" 2>&1
      echo "rc $? in $(( $(date +%s) - start )) s" >>"$log"
      flock "$OUT/sanitizers.log" -c "cat '$log' >>'$OUT/sanitizers.log'"
      note "$tool:$target: $(grep -E 'SUMMARY|hazards' "$log" | tail -1) | $(grep -E '[0-9]+ (passed|failed)|[0-9]+ errors? in|cases x' "$log" | tail -1) | $(tail -1 "$log") $(grep -E '^FAILED' "$log" | head -3)"
      [ "$tool" = initcheck ] && note "  reports in our kernels: $(grep -A1 -E 'Uninitialized|Invalid' "$log" | grep -c 'at .*w4afp8')"
      true ) &
    [[ $alone == *" $target "* ]] && wait
  done
  wait
  unset XLA_PYTHON_CLIENT_ALLOCATOR XLA_FLAGS
fi

if run_phase example; then
  timeout "$LIMIT" python3 examples/deepseek_v3_decode.py ${EXAMPLE_ARGS:-} >"$OUT/example.log" 2>&1
  note "example (rc $?):"; note "$(tail -15 "$OUT/example.log")"
fi

if run_phase profile; then
  # Nsight Compute sections (speed of light, occupancy, warp states) of the kernels matching
  # PROFILE_KERNELS in one decode layer at B = 1.
  timeout "$LIMIT" ncu --clock-control none --kernel-name "regex:${PROFILE_KERNELS:-DeepseekTopk}" --launch-skip 1 \
    --launch-count "${PROFILE_COUNT:-1}" --section SpeedOfLight --section LaunchStats --section Occupancy \
    --section WarpStateStats --section SchedulerStats --section MemoryWorkloadAnalysis \
    python3 benchmarks/ncu_layer.py launch --tokens "${PROFILE_TOKENS:-1}" >"$OUT/profile.txt" 2>&1
  note "profile (rc $?): $(grep -cE 'Duration' "$OUT/profile.txt") kernels in profile.txt"
  note "$(grep -E '^  [A-Za-z].*\(|Duration|Registers Per|Achieved Occupancy|Warp Cycles Per Issued|Issued Warp|No Eligible' "$OUT/profile.txt" | head -20)"
fi

if run_phase ab; then
  ab_batches=${AB_BATCHES:-1,16,512,8192}
  ncu_run() {  # label, package root, configs
    timeout "$LIMIT" ncu --clock-control none --kernel-name regex:GroupedGemm --metrics gpu__time_duration.sum --csv \
      env PYTHONPATH="$2" python3 "$2/benchmarks/ncu_gemm_tiles.py" launch --order "$AUX/ab_$1_order.json" \
      --configs "$3" --batches "$ab_batches" >"$AUX/ab_$1.csv" 2>"$AUX/ab_$1.err"
    PYTHONPATH="$2" python3 "$2/benchmarks/ncu_gemm_tiles.py" report --order "$AUX/ab_$1_order.json" \
      --csv "$AUX/ab_$1.csv" >"$OUT/ab_$1.txt"
    note "ab $1:"; note "$(grep -A40 '^best' "$OUT/ab_$1.txt")"
  }
  [ -d .ab/old ] && [ "${AB_OLD_CONFIGS:-}" != none ] && ncu_run old .ab/old "${AB_OLD_CONFIGS:-1,10,6,15}"
  ncu_run new . "${AB_NEW_CONFIGS:-register_16x8_k4_s4,stream_32x8_s6,register_128x32_k1_s2,wgmma_128x128_s4}"
fi

if run_phase layer; then
  for b in ${LAYER_TOKENS:-1 20}; do
    timeout "$LIMIT" ncu --clock-control none --metrics gpu__time_duration.sum --csv \
      python3 benchmarks/ncu_layer.py launch --tokens "$b" >"$AUX/ncu_layer.csv" 2>"$AUX/ncu_layer.err"
    echo "layer B=$b:" >>"$OUT/layer.txt"
    python3 benchmarks/ncu_layer.py report --csv "$AUX/ncu_layer.csv" >>"$OUT/layer.txt" 2>&1
  done
  note "$(cat "$OUT/layer.txt")"
fi

if run_phase envab; then
  # bench_decode.py once per variant of ENVAB, in order, with ENVAB_ARGS: an A/B of launch-time
  # switches in one call. Variants are separated by "|"; in each, VAR=value words set the
  # environment and --arg=value words are extra arguments (default: PDL off, PDL on).
  IFS='|' read -ra variants <<<"${ENVAB:-W4AFP8_PDL=0|W4AFP8_PDL=1}"
  for variant in "${variants[@]}"; do
    envs=() extra=()
    for word in $variant; do if [[ $word == --* ]]; then extra+=("$word"); else envs+=("$word"); fi; done
    timeout "$LIMIT" env "${envs[@]}" python3 benchmarks/bench_decode.py ${ENVAB_ARGS:---no-peers --batches 1,4,16,64} \
      "${extra[@]}" >"$AUX/envab.log" 2>&1
    note "bench_decode with [$variant] (rc $?):"; note "$(grep -E '^  B=|Error|error' "$AUX/envab.log" | head -30)"
  done
fi

if run_phase bench || run_phase bench_decode; then
  timeout "$LIMIT" python3 benchmarks/bench_decode.py --json "$OUT/bench_decode.json" --png "$OUT/bench_decode.png" \
    ${BENCH_DECODE_ARGS:-} >"$AUX/bench_decode.log" 2>&1
  note "bench_decode (rc $?):"; note "$(tail -32 "$AUX/bench_decode.log")"
fi
if run_phase bench || run_phase bench_gemm; then
  # BENCH_GEMM_ARGS: more arguments (e.g. --sweep CONFIGS --highest-min-b 1); the log is kept
  # whole, since a run stopped at its limit prints no table.
  timeout "$LIMIT" python3 benchmarks/bench_gemm.py --json "$OUT/bench_gemm.json" --png "$OUT/bench_gemm.png" \
    --batches "${BENCH_GEMM_BATCHES:-1,4,16,32,64,128,256,512,1024,2048,4096,8192}" \
    --peers "${BENCH_GEMM_PEERS:-seed,torch-fp8}" ${BENCH_GEMM_ARGS:-} >"$OUT/bench_gemm.log" 2>&1
  note "bench_gemm (rc $?):"; note "$(tail -40 "$OUT/bench_gemm.log")"
fi

if run_phase multi; then
  timeout "$LIMIT" python3 -m pytest -q -m gpu -p no:cacheprovider -rfEs tests/test_multi_gpu_gpu.py \
    >"$OUT/pytest_multi.log" 2>&1
  note "multi-GPU tests (rc $?): $(grep -E '^(FAILED|ERROR) ' "$OUT/pytest_multi.log" | head -10)"
  note "$(tail -1 "$OUT/pytest_multi.log")"
  timeout "$LIMIT" python3 benchmarks/bench_multi_gpu.py --json "$OUT/bench_multi_gpu.json" ${BENCH_MULTI_ARGS:-} \
    >"$AUX/bench_multi_gpu.log" 2>&1
  note "bench_multi_gpu (rc $?):"; note "$(tail -30 "$AUX/bench_multi_gpu.log")"
fi
echo "================ summary"
cat "$SUMMARY"
exit "$status"
