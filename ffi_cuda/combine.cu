#include "combine.h"
#include "launch.cuh"

namespace w4afp8 {
namespace {

constexpr int kThreads = 128;
constexpr int kVec = 8;  // bf16 per 16-byte access

constexpr int kSlotBatch = 8;  // slots whose loads are issued together

// Grid: (tokens, column blocks); tokens go on x, which has no 65535 limit. Each thread owns
// kVec consecutive columns of one token and sums that token's slots in slot order. The slots
// go in batches whose positions, weights and rows are all loaded before any is added, so a
// token's top_k row reads overlap instead of queueing behind each other.
template <bool kVectorized>
__global__ void CombineKernel(const __nv_bfloat16* __restrict__ rows, const int32_t* __restrict__ positions,
                              const float* __restrict__ weights, __nv_bfloat16* __restrict__ out,
                              int top_k, int64_t hidden, int64_t num_rows, float scaling) {
  BeginKernel();
  const int64_t token = blockIdx.x;
  const int64_t col = (static_cast<int64_t>(blockIdx.y) * kThreads + threadIdx.x) * kVec;
  if (col >= hidden) return;
  const int width = static_cast<int>(min(static_cast<int64_t>(kVec), hidden - col));
  float acc[kVec] = {};
  for (int j0 = 0; j0 < top_k; j0 += kSlotBatch) {
    bool kept[kSlotBatch];
    float w[kSlotBatch];
    float v[kSlotBatch][kVec];
#pragma unroll
    for (int b = 0; b < kSlotBatch; ++b) {
      const int j = j0 + b;
      const int32_t pos = j < top_k ? positions[token * top_k + j] : -1;
      kept[b] = pos >= 0 && pos < num_rows;
      w[b] = kept[b] ? weights[token * top_k + j] : 0.0f;
      const __nv_bfloat16* src = rows + (kept[b] ? pos : 0) * hidden + col;
      if constexpr (kVectorized) {
        const uint4 packed = kept[b] ? *reinterpret_cast<const uint4*>(src) : make_uint4(0, 0, 0, 0);
        const __nv_bfloat162* pairs = reinterpret_cast<const __nv_bfloat162*>(&packed);
#pragma unroll
        for (int i = 0; i < kVec / 2; ++i) {
          const float2 f = __bfloat1622float2(pairs[i]);
          v[b][2 * i] = f.x;
          v[b][2 * i + 1] = f.y;
        }
      } else {
#pragma unroll
        for (int i = 0; i < kVec; ++i) v[b][i] = kept[b] && i < width ? __bfloat162float(src[i]) : 0.0f;
      }
    }
#pragma unroll
    for (int b = 0; b < kSlotBatch; ++b) {  // dropped slots add nothing (not even w * 0)
      if (!kept[b]) continue;
#pragma unroll
      for (int i = 0; i < kVec; ++i) acc[i] += w[b] * v[b][i];
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
    for (int i = 0; i < width; ++i) dst[i] = __float2bfloat16_rn(acc[i] * scaling);
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
  return Launch(vectorized ? CombineKernel<true> : CombineKernel<false>, grid, kThreads, 0, stream, rows, positions,
                weights, out, top_k, hidden, num_rows, scaling);
}

}  // namespace w4afp8
