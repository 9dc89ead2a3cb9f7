// Operand loading for the grouped-GEMM kernels: where a lane's weight, scale and activation
// bytes live, the int4 -> e4m3 conversion, and the per-stage layout of the cp.async rings.
//
// MMA lane (g, t) = (lane / 4, lane % 4) of a 16-row weight tile reads K elements
// [32t, 32t + 32) of rows g and g + 8 of each 128-wide K group, and the same K elements of
// token g of an 8-token tile. Within a group the K order is thus permuted identically for
// weights and activations (the sum does not care), and every load is 16 contiguous bytes.
#pragma once

#include "../grouped_gemm.h"
#include "../kernel_limits.h"
#include "ptx.cuh"

namespace w4afp8::gemm {

// Eight signed int4 (nibble i = element i) -> the e4m3 bytes of elements 0..3 (lo) and 4..7
// (hi). Byte permutes look the magnitudes up in two 8-entry tables (non-negative values and
// negative values); a third permute in sign-replicate mode builds the 0xFF mask of negative
// nibbles, using w << 4 to bring each even nibble's sign bit to a byte's top bit. Every int4
// value is exact in e4m3.
__device__ __forceinline__ void Int4ToE4m3(uint32_t w, uint32_t& lo, uint32_t& hi) {
  constexpr uint32_t kNonNegLo = 0x44403800u;  // e4m3 of 0, 1, 2, 3
  constexpr uint32_t kNonNegHi = 0x4E4C4A48u;  // 4, 5, 6, 7
  constexpr uint32_t kNegLo = 0xCACCCED0u;     // -8, -7, -6, -5
  constexpr uint32_t kNegHi = 0xB8C0C4C8u;     // -4, -3, -2, -1
  const uint32_t index_lo = w & 0x7777u;
  const uint32_t index_hi = (w >> 16) & 0x7777u;
  const uint32_t shifted = w << 4;
  const uint32_t negative_lo = Permute(shifted, w, 0xD9C8u);
  const uint32_t negative_hi = Permute(shifted, w, 0xFBEAu);
  lo = (Permute(kNonNegLo, kNonNegHi, index_lo) & ~negative_lo) | (Permute(kNegLo, kNegHi, index_lo) & negative_lo);
  hi = (Permute(kNonNegLo, kNonNegHi, index_hi) & ~negative_hi) | (Permute(kNegLo, kNegHi, index_hi) & negative_hi);
}

// The exact families' operands for f16 MMAs. Within a lane's 8 consecutive K elements e0..e7
// (one 32-bit word of int4, two of e4m3) the MMA pairs are (e0, e4), (e1, e5), (e2, e6),
// (e3, e7): the pairs the nibble masks below extract without shifts, taken identically from
// weights and activations, so the sum is unchanged.
//
// Eight signed int4 (nibble i = element i) -> pairs[j] = f16x2 (element j, element j + 4).
// One LOP3 per pair, (w & mask) ^ magic: it places the nibble (or 16 x the nibble) in the
// mantissa of f16 1024 and flips its sign bit, giving 1024 + value + 8 (1024 + 16 (value + 8)),
// exact; one f16x2 subtract (or fma by 1/16) leaves the value, exact.
__device__ __forceinline__ void Int4ToF16Pairs(uint32_t w, uint32_t (&pairs)[4]) {
  constexpr uint32_t kLowNibbles = 0x000f000fu, kHighNibbles = 0x00f000f0u;
  constexpr uint32_t kLowMagic = 0x64086408u, kHighMagic = 0x64806480u;  // f16 1024, nibble sign bits set
  constexpr uint32_t kF16_1032 = 0x64086408u, kF16_1_16 = 0x2c002c00u, kF16_minus72 = 0xd480d480u;
  const uint32_t shifted = w >> 8;
  pairs[0] = SubF16x2(AndXor(w, kLowNibbles, kLowMagic), kF16_1032);
  pairs[1] = FmaF16x2(AndXor(w, kHighNibbles, kHighMagic), kF16_1_16, kF16_minus72);
  pairs[2] = SubF16x2(AndXor(shifted, kLowNibbles, kLowMagic), kF16_1032);
  pairs[3] = FmaF16x2(AndXor(shifted, kHighNibbles, kHighMagic), kF16_1_16, kF16_minus72);
}

// Eight e4m3 (elements 0..3 in lo, 4..7 in hi, low byte first) -> the same f16x2 pairs.
__device__ __forceinline__ void E4m3ToF16Pairs(uint32_t lo, uint32_t hi, uint32_t (&pairs)[4]) {
  const uint32_t p01 = Permute(lo, hi, 0x5140u);  // bytes e0, e4, e1, e5
  const uint32_t p23 = Permute(lo, hi, 0x7362u);  // bytes e2, e6, e3, e7
  pairs[0] = E4m3x2ToF16x2(p01);
  pairs[1] = E4m3x2ToF16x2(p01 >> 16);
  pairs[2] = E4m3x2ToF16x2(p23);
  pairs[3] = E4m3x2ToF16x2(p23 >> 16);
}

// A lane's 16 bytes of weight row (tile_row + g + 8 * half) for K group 0; group j is at
// + j * WeightGroupStride.
__device__ __forceinline__ const uint8_t* WeightLaneBase(const GroupedGemmArgs& args, int64_t expert,
                                                         int64_t tile_row, int half, int lane) {
  const int64_t expert_base = expert * args.n * (args.k / 2);
  if (args.tiled_weights) {
    return args.packed + expert_base + (tile_row / 16) * (args.k / kGroupSize) * 1024 + half * 512 + lane * 16;
  }
  return args.packed + expert_base + (tile_row + lane / 4 + 8 * half) * (args.k / 2) + (lane % 4) * 16;
}

__device__ __forceinline__ int64_t WeightGroupStride(const GroupedGemmArgs& args) {
  return args.tiled_weights ? 1024 : kGroupSize / 2;
}

__device__ __forceinline__ uint32_t Word(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// One K group's operands for one lane of a warp computing kMTiles 16-row weight tiles by
// kTTiles 8-token tiles.
template <class Cfg>
struct GroupFragments {
  uint4 weights[Cfg::kMTiles][2];      // rows g, g + 8 of each 16-row tile: 32 int4 each
  uint4 activations[Cfg::kTTiles][2];  // token g of each 8-token tile: 32 fp8
  float scales[Cfg::kMTiles][2];
};

// Where one lane's operands of one work unit live.
template <class Cfg>
struct WarpOperands {
  const uint8_t* weight_rows[Cfg::kMTiles][2];
  const float* scale_rows[Cfg::kMTiles][2];
  const uint8_t* token_rows[Cfg::kTTiles];
  bool tile_valid[Cfg::kMTiles];
  bool token_valid[Cfg::kTTiles];
  int64_t weight_group_stride;

  // The 16 * kMTiles weight rows from row0 of `expert` and the 8 * kTTiles tokens from
  // token_begin (token_count of them real); rows past N and missing tokens point at valid
  // memory and are marked invalid.
  __device__ __forceinline__ void Point(const GroupedGemmArgs& args, int expert, int64_t row0,
                                        int64_t token_begin, int token_count, int lane) {
    const int g = lane / 4, t = lane % 4;
    const int groups = static_cast<int>(args.k / kGroupSize);
    weight_group_stride = WeightGroupStride(args);
#pragma unroll
    for (int mt = 0; mt < Cfg::kMTiles; ++mt) {
      tile_valid[mt] = row0 + mt * 16 < args.n;
      const int64_t tile_row = tile_valid[mt] ? row0 + mt * 16 : 0;
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        weight_rows[mt][half] = WeightLaneBase(args, expert, tile_row, half, lane);
        scale_rows[mt][half] = args.scales + (expert * args.n + tile_row + g + 8 * half) * groups;
      }
    }
#pragma unroll
    for (int tt = 0; tt < Cfg::kTTiles; ++tt) {
      const int token = tt * 8 + g;
      token_valid[tt] = token < token_count;
      token_rows[tt] = args.lhs + (token_valid[tt] ? token_begin + token : 0) * args.k + t * 32;
    }
  }

  // Straight into registers (the register kernel's ring).
  __device__ __forceinline__ void Load(GroupFragments<Cfg>& f, int group) const {
#pragma unroll
    for (int mt = 0; mt < Cfg::kMTiles; ++mt) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        f.weights[mt][half] = tile_valid[mt] ? LoadStreaming(weight_rows[mt][half] + group * weight_group_stride)
                                             : make_uint4(0, 0, 0, 0);
        f.scales[mt][half] = tile_valid[mt] ? __ldg(scale_rows[mt][half] + group) : 0.f;
      }
    }
#pragma unroll
    for (int tt = 0; tt < Cfg::kTTiles; ++tt) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        f.activations[tt][half] =
            token_valid[tt] ? __ldg(reinterpret_cast<const uint4*>(token_rows[tt] + group * kGroupSize) + half)
                            : make_uint4(0, 0, 0, 0);
      }
    }
  }
};

// One warp's stage of a lane-private cp.async ring (the streaming kernel): 16-byte chunks laid
// out lane-contiguously (conflict-free), weights, then activations, then the lane's scales.
// Both the copy side (Issue) and the read side (Read) use these offsets.
template <class Cfg>
struct LaneStage {
  static constexpr int kWeightChunks = 2 * Cfg::kMTiles;
  static constexpr int kActChunks = 2 * Cfg::kTTiles;
  static constexpr int kScaleOffset = 512 * (kWeightChunks + kActChunks);
  static constexpr int kBytes = kScaleOffset + 32 * 8 * Cfg::kMTiles;
  __device__ static constexpr int Weight(int mt, int half, int lane) { return (2 * mt + half) * 512 + lane * 16; }
  __device__ static constexpr int Act(int tt, int half, int lane) {
    return (kWeightChunks + 2 * tt + half) * 512 + lane * 16;
  }
  __device__ static constexpr int Scale(int mt, int half, int lane) {
    return kScaleOffset + lane * 8 * Cfg::kMTiles + (2 * mt + half) * 4;
  }

  // Invalid operands are zero-filled by cp.async (source size 0), never read.
  __device__ static void Issue(uint8_t* stage, const WarpOperands<Cfg>& ops, int group, int lane) {
#pragma unroll
    for (int mt = 0; mt < Cfg::kMTiles; ++mt) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        CopyAsync16(stage + Weight(mt, half, lane), ops.weight_rows[mt][half] + group * ops.weight_group_stride,
                    ops.tile_valid[mt]);
        CopyAsync4(stage + Scale(mt, half, lane), ops.scale_rows[mt][half] + group, ops.tile_valid[mt]);
      }
    }
#pragma unroll
    for (int tt = 0; tt < Cfg::kTTiles; ++tt) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        CopyAsync16(stage + Act(tt, half, lane), ops.token_rows[tt] + group * kGroupSize + half * 16,
                    ops.token_valid[tt]);
      }
    }
  }

  __device__ static void Read(const uint8_t* stage, int lane, GroupFragments<Cfg>& f) {
#pragma unroll
    for (int mt = 0; mt < Cfg::kMTiles; ++mt) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        f.weights[mt][half] = *reinterpret_cast<const uint4*>(stage + Weight(mt, half, lane));
        f.scales[mt][half] = *reinterpret_cast<const float*>(stage + Scale(mt, half, lane));
      }
    }
#pragma unroll
    for (int tt = 0; tt < Cfg::kTTiles; ++tt) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        f.activations[tt][half] = *reinterpret_cast<const uint4*>(stage + Act(tt, half, lane));
      }
    }
  }
};

}  // namespace w4afp8::gemm
