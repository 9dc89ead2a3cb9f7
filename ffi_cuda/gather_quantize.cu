#include "gather_quantize.h"
#include "launch.cuh"
#include "quantize_rows.cuh"

namespace w4afp8 {
namespace {

// One thread per (token, 16 columns): reads its 32 bytes of x once, quantizes them once and
// stores the 16 fp8 bytes to every kept slot of the token (see MakeRowChunkLaunch for the grid).
template <bool kVectorized>
__global__ void GatherQuantizeKernel(const __nv_bfloat16* __restrict__ x, const int32_t* __restrict__ positions,
                                     const float* __restrict__ scale_ptr, uint8_t* __restrict__ out,
                                     int64_t num_tokens, int top_k, int64_t hidden, int64_t num_rows) {
  BeginKernel();
  const int64_t token = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const int64_t col = (static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x) * kQuantCols;
  if (token >= num_tokens || col >= hidden) return;
  const float scale = *scale_ptr;
  const __nv_bfloat16* src = x + token * hidden + col;
  const int32_t* slots = positions + token * top_k;
  if constexpr (kVectorized) {
    const uint4* src_vec = reinterpret_cast<const uint4*>(src);
    const uint4 lo = src_vec[0], hi = src_vec[1];
    float v[kQuantCols];
    Bf16x8ToFloat(lo, v);
    Bf16x8ToFloat(hi, v + 8);
    const uint4 q = QuantizeFp8x16(v, scale);
    for (int j = 0; j < top_k; ++j) {
      const int32_t pos = slots[j];
      if (pos < 0 || pos >= num_rows) continue;
      *reinterpret_cast<uint4*>(out + pos * hidden + col) = q;
    }
  } else {
    const int width = static_cast<int>(min(static_cast<int64_t>(kQuantCols), hidden - col));
    uint8_t q[kQuantCols];
    for (int i = 0; i < width; ++i) q[i] = QuantizeFp8(__bfloat162float(src[i]), scale);
    for (int j = 0; j < top_k; ++j) {
      const int32_t pos = slots[j];
      if (pos < 0 || pos >= num_rows) continue;
      uint8_t* dst = out + pos * hidden + col;
      for (int i = 0; i < width; ++i) dst[i] = q[i];
    }
  }
}

}  // namespace

cudaError_t LaunchGatherQuantize(const __nv_bfloat16* x, const int32_t* positions, const float* scale,
                                 uint8_t* out, int64_t num_tokens, int64_t top_k, int64_t hidden,
                                 cudaStream_t stream) {
  if (num_tokens == 0 || top_k == 0 || hidden == 0) return cudaSuccess;
  const int64_t chunks = (hidden + kQuantCols - 1) / kQuantCols;
  const RowChunkLaunch launch = MakeRowChunkLaunch(num_tokens, chunks);
  const int64_t num_rows = num_tokens * top_k;
  // 16-byte accesses need hidden % 16 == 0 (every row start aligned) and aligned bases.
  const bool vectorized = hidden % kQuantCols == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0 &&
                          reinterpret_cast<uintptr_t>(out) % 16 == 0;
  const auto kernel = vectorized ? GatherQuantizeKernel<true> : GatherQuantizeKernel<false>;
  // Rows no slot names (dropped slots leave holes at the end) are zero, as on the reference
  // path, so no caller ever reads unwritten memory; the kernel then writes the named ones.
  const cudaError_t status = cudaMemsetAsync(out, 0, num_rows * hidden, stream);
  if (status != cudaSuccess) return status;
  return Launch(kernel, launch.grid, launch.block, 0, stream, x, positions, scale, out, num_tokens,
                static_cast<int>(top_k), hidden, num_rows);
}

}  // namespace w4afp8
