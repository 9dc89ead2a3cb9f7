// The one epilogue of every kernel family: accumulators go through a token-major f32 tile in
// shared memory (which also sums split-K partial tiles) and leave as 16-byte bf16 row stores.
#pragma once

#include <cuda_bf16.h>

#include <type_traits>

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
// tile[token * pitch + row0 + row]; the accumulators are reset to zero for the next unit.
// A float tile keeps raw sums (split-K parts are added and scaled in StoreTile); a bf16 tile
// holds the finished values, bf16(scale * sum), rounded once as in the float path, in half
// the shared memory. Pitches of 4 (mod 32) floats or 8 (mod 64) bf16 keep these writes free
// of bank conflicts and rows 16-byte aligned.
template <class T, int kM, int kT>
__device__ __forceinline__ void StageAccumulators(T* tile, int pitch, int row0, float (&acc)[kM][kT][4], float scale,
                                                  int lane) {
  const int g = lane / 4, t = lane % 4;
  const auto finish = [scale](float v) {
    if constexpr (std::is_same_v<T, float>) {
      return v;
    } else {
      return __float2bfloat16_rn(v * scale);
    }
  };
#pragma unroll
  for (int mt = 0; mt < kM; ++mt) {
#pragma unroll
    for (int tt = 0; tt < kT; ++tt) {
      T* p = tile + (tt * 8 + 2 * t) * pitch + row0 + mt * 16 + g;
      p[0] = finish(acc[mt][tt][0]);
      p[pitch] = finish(acc[mt][tt][1]);
      p[8] = finish(acc[mt][tt][2]);
      p[pitch + 8] = finish(acc[mt][tt][3]);
      acc[mt][tt][0] = acc[mt][tt][1] = acc[mt][tt][2] = acc[mt][tt][3] = 0.f;
    }
  }
}

// out[token_begin + token, col0 + c] = the tile's (token, c) for tokens < token_count and
// columns < N, as 16-byte stores: from a float tile, bf16(scale * sum over kParts tiles
// part_stride floats apart); from a bf16 tile (kParts = 1), a copy. Threads index,
// index + count, ... of the caller share the work.
template <int kParts, int kTokens, int kCols, class T>
__device__ __forceinline__ void StoreTile(const T* tile, int pitch, int part_stride, const GroupedGemmArgs& args,
                                          int64_t token_begin, int token_count, int64_t col0, float scale,
                                          int index, int count) {
  static_assert(std::is_same_v<T, float> || kParts == 1, "bf16 tiles hold finished values");
  for (int idx = index; idx < kTokens * kCols / 8; idx += count) {
    const int token = idx / (kCols / 8), col = (idx % (kCols / 8)) * 8;
    if (token >= token_count || col0 + col >= args.n) continue;
    uint4 packed;
    if constexpr (std::is_same_v<T, float>) {
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
      packed = PackBf16x8(v);
    } else {
      packed = *reinterpret_cast<const uint4*>(tile + token * pitch + col);
    }
    *reinterpret_cast<uint4*>(args.out + (token_begin + token) * args.n + col0 + col) = packed;
  }
}

}  // namespace w4afp8::gemm
