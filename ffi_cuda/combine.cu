#include "combine.h"

namespace w4afp8 {
namespace {

constexpr int kThreads = 128;
constexpr int kVec = 8;  // bf16 per 16-byte access

// Grid: (tokens, column blocks); tokens go on x, which has no 65535 limit. Each thread owns kVec consecutive columns of one token and
// sums that token's slots in slot order.
template <bool kVectorized>
__global__ void CombineKernel(const __nv_bfloat16* __restrict__ rows, const int32_t* __restrict__ positions,
                              const float* __restrict__ weights, __nv_bfloat16* __restrict__ out,
                              int top_k, int64_t hidden, int64_t num_rows, float scaling) {
  const int64_t token = blockIdx.x;
  const int64_t col = (static_cast<int64_t>(blockIdx.y) * kThreads + threadIdx.x) * kVec;
  if (col >= hidden) return;
  float acc[kVec] = {};
  for (int j = 0; j < top_k; ++j) {
    const int32_t pos = positions[token * top_k + j];
    if (pos < 0 || pos >= num_rows) continue;
    const float w = weights[token * top_k + j];
    const __nv_bfloat16* src = rows + pos * hidden + col;
    if constexpr (kVectorized) {
      const uint4 packed = *reinterpret_cast<const uint4*>(src);
      const __nv_bfloat162* pairs = reinterpret_cast<const __nv_bfloat162*>(&packed);
#pragma unroll
      for (int i = 0; i < kVec / 2; ++i) {
        const float2 f = __bfloat1622float2(pairs[i]);
        acc[2 * i] += w * f.x;
        acc[2 * i + 1] += w * f.y;
      }
    } else {
      for (int i = 0; i < kVec && col + i < hidden; ++i) acc[i] += w * __bfloat162float(src[i]);
    }
  }
  __nv_bfloat16* dst = out + token * hidden + col;
  if constexpr (kVectorized) {
    uint4 packed;
    __nv_bfloat162* pairs = reinterpret_cast<__nv_bfloat162*>(&packed);
#pragma unroll
    for (int i = 0; i < kVec / 2; ++i) pairs[i] = __floats2bfloat162_rn(acc[2 * i] * scaling, acc[2 * i + 1] * scaling);
    *reinterpret_cast<uint4*>(dst) = packed;
  } else {
    for (int i = 0; i < kVec && col + i < hidden; ++i) dst[i] = __float2bfloat16_rn(acc[i] * scaling);
  }
}

}  // namespace

cudaError_t LaunchCombine(const __nv_bfloat16* rows, const int32_t* positions, const float* weights,
                          __nv_bfloat16* out, int64_t num_tokens, int64_t top_k, int64_t hidden,
                          int64_t num_rows, float scaling, cudaStream_t stream) {
  if (num_tokens == 0 || hidden == 0) return cudaSuccess;
  const dim3 grid(num_tokens, (hidden + kThreads * kVec - 1) / (kThreads * kVec));
  // 16-byte accesses need every row start 16-byte aligned; XLA buffers are, so only hidden matters.
  const bool vectorized = hidden % kVec == 0 && reinterpret_cast<uintptr_t>(rows) % 16 == 0 &&
                          reinterpret_cast<uintptr_t>(out) % 16 == 0;
  if (vectorized) {
    CombineKernel<true><<<grid, kThreads, 0, stream>>>(rows, positions, weights, out, top_k, hidden, num_rows, scaling);
  } else {
    CombineKernel<false><<<grid, kThreads, 0, stream>>>(rows, positions, weights, out, top_k, hidden, num_rows, scaling);
  }
  return cudaGetLastError();
}

}  // namespace w4afp8
