// The one epilogue of every kernel family: accumulators go through a token-major f32 tile in
// shared memory (which also sums split-K partial tiles) and leave as 16-byte bf16 row stores.
#pragma once

#include <cuda_bf16.h>

#include "../grouped_gemm.h"

namespace w4afp8::gemm {

__device__ __forceinline__ uint4 PackBf16x8(const float (&v)[8]) {
  uint4 packed;
  __nv_bfloat162* pairs = reinterpret_cast<__nv_bfloat162*>(&packed);
#pragma unroll
  for (int i = 0; i < 4; ++i) pairs[i] = __floats2bfloat162_rn(v[2 * i], v[2 * i + 1]);
  return packed;
}

// MMA-layout accumulators (lane (g, t): rows 16 mt + g and + 8, tokens 8 tt + 2t and + 1) ->
// tile[token * pitch + row0 + row]; the accumulators are reset to zero for the next unit. A
// pitch of 4 (mod 32) floats keeps these writes free of bank conflicts.
template <int kM, int kT>
__device__ __forceinline__ void StageAccumulators(float* tile, int pitch, int row0, float (&acc)[kM][kT][4],
                                                  int lane) {
  const int g = lane / 4, t = lane % 4;
#pragma unroll
  for (int mt = 0; mt < kM; ++mt) {
#pragma unroll
    for (int tt = 0; tt < kT; ++tt) {
      float* p = tile + (tt * 8 + 2 * t) * pitch + row0 + mt * 16 + g;
      p[0] = acc[mt][tt][0];
      p[pitch] = acc[mt][tt][1];
      p[8] = acc[mt][tt][2];
      p[pitch + 8] = acc[mt][tt][3];
      acc[mt][tt][0] = acc[mt][tt][1] = acc[mt][tt][2] = acc[mt][tt][3] = 0.f;
    }
  }
}

// out[token_begin + token, col0 + c] = bf16(scale * sum over kParts tiles (part_stride floats
// apart) of tile[token * pitch + c]) for tokens < token_count and columns < N, as 16-byte
// stores; threads index, index + count, ... of the caller share the work.
template <int kParts, int kTokens, int kCols>
__device__ __forceinline__ void StoreTile(const float* tile, int pitch, int part_stride, const GroupedGemmArgs& args,
                                          int64_t token_begin, int token_count, int64_t col0, float scale,
                                          int index, int count) {
  for (int idx = index; idx < kTokens * kCols / 8; idx += count) {
    const int token = idx / (kCols / 8), col = (idx % (kCols / 8)) * 8;
    if (token >= token_count || col0 + col >= args.n) continue;
    float v[8] = {};
#pragma unroll
    for (int part = 0; part < kParts; ++part) {
      const float* src = tile + part * part_stride + token * pitch + col;
      const float4 x0 = *reinterpret_cast<const float4*>(src);
      const float4 x1 = *reinterpret_cast<const float4*>(src + 4);
      v[0] += x0.x; v[1] += x0.y; v[2] += x0.z; v[3] += x0.w;
      v[4] += x1.x; v[5] += x1.y; v[6] += x1.z; v[7] += x1.w;
    }
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] *= scale;
    *reinterpret_cast<uint4*>(args.out + (token_begin + token) * args.n + col0 + col) = PackBf16x8(v);
  }
}

}  // namespace w4afp8::gemm
