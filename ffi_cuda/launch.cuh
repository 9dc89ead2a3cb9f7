// How every kernel of this library is launched: with programmatic dependent launch (PDL, sm_90).
//
// A kernel launched with programmatic stream serialization may be scheduled while the kernel
// before it in the stream is still running, once all of that kernel's blocks have executed
// griddepcontrol.launch_dependents (or exited). Its launch latency and block set-up then
// overlap the previous kernel's tail: at decode a layer is nine small kernels, so nine launch
// latencies. (One A/B run showed no effect above the benchmark's spread: docs/performance.md,
// session 3.) Safety rests on one rule, kept by every kernel here: BeginKernel() is its first
// statement, before any global-memory access, so nothing is read before the grids it depends
// on have completed and flushed their writes, and nothing is written that they may still read. Launched without the attribute (W4AFP8_PDL=0), a kernel starts after the previous
// one has completed, as usual, and griddepcontrol.wait returns at once.
#pragma once

#include <cuda_runtime.h>

#include <cstdlib>
#include <string_view>
#include <utility>

namespace w4afp8 {

// Waits for the grids this one depends on (completed, writes visible), then lets the next
// kernel in the stream start launching.
__device__ __forceinline__ void BeginKernel() {
  asm volatile("griddepcontrol.wait;" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
}

// W4AFP8_PDL=0 launches every kernel without the attribute (for A/B measurements and as an
// escape hatch); read once per process.
inline bool PdlEnabled() {
  static const bool enabled = [] {
    const char* value = std::getenv("W4AFP8_PDL");
    return value == nullptr || std::string_view(value) != "0";
  }();
  return enabled;
}

// kernel<<<grid, block, smem, stream>>>(args...) with programmatic stream serialization.
template <class... Params, class... Args>
cudaError_t Launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                   Args&&... args) {
  cudaLaunchAttribute attribute{};
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = &attribute;
  config.numAttrs = PdlEnabled() ? 1 : 0;
  return cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
}

}  // namespace w4afp8
