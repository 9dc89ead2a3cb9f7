// The exact per-group arithmetic of the warp-level kernels: one K group of a warp's tiles on
// the tensor cores, then its f32 sum times the group scale into the f32 accumulators.
#pragma once

#include "operands.cuh"

namespace w4afp8::gemm {

// acc[mt][tt] is the MMA accumulator layout: lane (g, t) holds rows g, g + 8 of weight tile mt
// and tokens 2t, 2t + 1 of token tile tt.
template <class Cfg>
__device__ __forceinline__ void AccumulateGroup(const GroupFragments<Cfg>& f,
                                                float (&acc)[Cfg::kMTiles][Cfg::kTTiles][4]) {
  float group_sum[Cfg::kMTiles][Cfg::kTTiles][4] = {};
#pragma unroll
  for (int step = 0; step < 4; ++step) {  // 4 MMAs of K = 32 cover the 128-wide group
    uint32_t a[Cfg::kMTiles][4];
#pragma unroll
    for (int mt = 0; mt < Cfg::kMTiles; ++mt) {
      Int4ToE4m3(Word(f.weights[mt][0], step), a[mt][0], a[mt][2]);
      Int4ToE4m3(Word(f.weights[mt][1], step), a[mt][1], a[mt][3]);
    }
#pragma unroll
    for (int tt = 0; tt < Cfg::kTTiles; ++tt) {
      const uint4& act = f.activations[tt][step / 2];
      const uint32_t b0 = Word(act, 2 * (step % 2));
      const uint32_t b1 = Word(act, 2 * (step % 2) + 1);
#pragma unroll
      for (int mt = 0; mt < Cfg::kMTiles; ++mt) MmaE4m3(group_sum[mt][tt], a[mt], b0, b1);
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

}  // namespace w4afp8::gemm
