// The per-group arithmetic: the exact one of the warp-level kernels (one K group of a warp's
// tiles on the tensor cores, then its f32 sum times the group scale into the f32 accumulators)
// and the wgmma families' promotion of a group's fp8 sums.
#pragma once

#include "operands.cuh"

namespace w4afp8::gemm {

// acc[mt][tt] is the MMA accumulator layout: lane (g, t) holds rows g, g + 8 of weight tile mt
// and tokens 2t, 2t + 1 of token tile tt. Each operand word is converted to f16 once per group
// and feeds two m16n8k16 MMAs (the f16x2 pairs of operands.cuh, registers a0..a3 = row g and
// row g + 8 of two pairs, b0, b1 = the same two pairs of token g).
template <class Cfg>
__device__ __forceinline__ void AccumulateGroup(const GroupFragments<Cfg>& f,
                                                float (&acc)[Cfg::kMTiles][Cfg::kTTiles][4]) {
  float group_sum[Cfg::kMTiles][Cfg::kTTiles][4] = {};
#pragma unroll
  for (int word = 0; word < 4; ++word) {  // 8 of the lane's 32 K elements of the group per word
    uint32_t a[Cfg::kMTiles][2][4];       // [tile][row g, g + 8][pair]
#pragma unroll
    for (int mt = 0; mt < Cfg::kMTiles; ++mt) {
      Int4ToF16Pairs(Word(f.weights[mt][0], word), a[mt][0]);
      Int4ToF16Pairs(Word(f.weights[mt][1], word), a[mt][1]);
    }
#pragma unroll
    for (int tt = 0; tt < Cfg::kTTiles; ++tt) {
      const uint4& act = f.activations[tt][word / 2];
      uint32_t b[4];
      E4m3ToF16Pairs(Word(act, 2 * (word % 2)), Word(act, 2 * (word % 2) + 1), b);
#pragma unroll
      for (int mt = 0; mt < Cfg::kMTiles; ++mt) {
        MmaF16(group_sum[mt][tt], a[mt][0][0], a[mt][1][0], a[mt][0][1], a[mt][1][1], b[0], b[1]);
        MmaF16(group_sum[mt][tt], a[mt][0][2], a[mt][1][2], a[mt][0][3], a[mt][1][3], b[2], b[3]);
      }
    }
  }
#pragma unroll
  for (int mt = 0; mt < Cfg::kMTiles; ++mt) {
#pragma unroll
    for (int tt = 0; tt < Cfg::kTTiles; ++tt) {
      acc[mt][tt][0] += f.scales[mt][0] * group_sum[mt][tt][0];
      acc[mt][tt][1] += f.scales[mt][0] * group_sum[mt][tt][1];
      acc[mt][tt][2] += f.scales[mt][1] * group_sum[mt][tt][2];
      acc[mt][tt][3] += f.scales[mt][1] * group_sum[mt][tt][3];
    }
  }
}

// The wgmma families' promotion: one K group's fp8 wgmma sums (the m64nN accumulator layout:
// lane (g, t) holds rows g, g + 8 and tokens 8i + 2t, + 1), read after wgmma.wait, times the
// group scales of rows g and g + 8, added into the f32 accumulators (the seed's, DeepGEMM's and
// TensorRT-LLM's numerics of precision=DEFAULT).
template <int kT>
__device__ __forceinline__ void PromoteGroup(float (&group_sum)[kT / 2], float scale_lo, float scale_hi,
                                             float (&acc)[1][kT / 8][4]) {
#pragma unroll
  for (int i = 0; i < kT / 2; ++i) asm volatile("" : "+f"(group_sum[i])::"memory");  // reads stay after the wait
#pragma unroll
  for (int tt = 0; tt < kT / 8; ++tt) {
    acc[0][tt][0] += scale_lo * group_sum[4 * tt];
    acc[0][tt][1] += scale_lo * group_sum[4 * tt + 1];
    acc[0][tt][2] += scale_hi * group_sum[4 * tt + 2];
    acc[0][tt][3] += scale_hi * group_sum[4 * tt + 3];
  }
}

}  // namespace w4afp8::gemm
