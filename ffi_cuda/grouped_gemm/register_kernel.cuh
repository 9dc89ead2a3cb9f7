// The register family (exact): warp-level f16 MMAs (mma.sync m16n8k16, mma.cuh) with the weights
// as the 16-row A operand and the tokens as the 8-column B operand, so decode (a few tokens
// per expert) still fills whole MMAs along the weight rows.
//
// A block computes one unit (kBlockN weight rows x kBlockT tokens of one expert) at a time:
// warps split the rows (kWarpsN) and the K groups (kWarpsK), each keeping kStages - 1 groups
// of loads in flight in a register ring (Little's law: each SM needs tens of KB of weight
// loads outstanding); split-K partial sums meet in the epilogue's shared tile.
#pragma once

#include "epilogue.cuh"
#include "mma.cuh"
#include "schedule.cuh"

namespace w4afp8::gemm {

template <int kMTiles_, int kTTiles_, int kWarpsN_, int kWarpsK_, int kStages_>
struct RegisterConfig {
  static constexpr const char* kFamily = "register";
  static constexpr bool kExact = true;
  static constexpr int kMTiles = kMTiles_;  // 16-row weight tiles per warp
  static constexpr int kTTiles = kTTiles_;  // 8-token tiles per block, shared by every warp
  static constexpr int kWarpsN = kWarpsN_;
  static constexpr int kWarpsK = kWarpsK_;
  static constexpr int kStages = kStages_;  // K groups of operands held per warp
  static constexpr int kThreads = 32 * kWarpsN * kWarpsK;
  static constexpr int kBlockN = 16 * kMTiles * kWarpsN;
  static constexpr int kBlockT = 8 * kTTiles;
  static constexpr int kRows = kBlockN;
  static constexpr int kTokens = kBlockT;
  static constexpr int kPitch = kBlockN + 4;  // see StageAccumulators
  static constexpr int kSmemBytes = 0;        // static shared memory only
  static std::string Name() {
    return "register_" + std::to_string(kBlockN) + "x" + std::to_string(kBlockT) + "_k" + std::to_string(kWarpsK) +
           "_s" + std::to_string(kStages);
  }
};

template <class Cfg>
__global__ void __launch_bounds__(Cfg::kThreads) GroupedGemmRegisterKernel(GroupedGemmArgs layer_args) {
  BeginKernel();
  const GroupedGemmArgs args = SelectLayer(layer_args);
  __shared__ TileTable<Cfg::kThreads, Cfg::kBlockT> table;
  __shared__ __align__(16) float tile_sums[Cfg::kWarpsK][Cfg::kBlockT][Cfg::kPitch];
  table.Build(args);

  const int num_experts = static_cast<int>(args.experts);
  const int groups = static_cast<int>(args.k / kGroupSize);
  const float lhs_scale = *args.lhs_scale;
  const int64_t row_blocks = (args.n + Cfg::kBlockN - 1) / Cfg::kBlockN;
  const int64_t units = static_cast<int64_t>(table.total_tiles(num_experts)) * row_blocks;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int warp_n = warp % Cfg::kWarpsN, warp_k = warp / Cfg::kWarpsN;

  for (int64_t unit_index = blockIdx.x; unit_index < units; unit_index += gridDim.x) {
    const Unit unit =
        LocateUnit<UnitOrder::kTokenTilesFastest>(table, unit_index, num_experts, row_blocks, Cfg::kBlockN);
    WarpOperands<Cfg> ops;
    ops.Point(args, unit.expert, unit.row0 + warp_n * 16 * Cfg::kMTiles, unit.token_begin, unit.token_count, lane);

    float acc[Cfg::kMTiles][Cfg::kTTiles][4] = {};
    GroupFragments<Cfg> ring[Cfg::kStages];
    const int my_groups = groups > warp_k ? (groups - warp_k + Cfg::kWarpsK - 1) / Cfg::kWarpsK : 0;
#pragma unroll
    for (int s = 0; s < Cfg::kStages - 1; ++s) {
      if (s < my_groups) ops.Load(ring[s], warp_k + s * Cfg::kWarpsK);
    }
    for (int i = 0; i < my_groups; i += Cfg::kStages) {
#pragma unroll
      for (int s = 0; s < Cfg::kStages; ++s) {
        const int ahead = i + s + Cfg::kStages - 1;
        if (ahead < my_groups) ops.Load(ring[(s + Cfg::kStages - 1) % Cfg::kStages], warp_k + ahead * Cfg::kWarpsK);
        if (i + s < my_groups) AccumulateGroup<Cfg>(ring[s], acc);
      }
    }

    StageAccumulators(&tile_sums[warp_k][0][0], Cfg::kPitch, warp_n * 16 * Cfg::kMTiles, acc, lhs_scale, lane);
    __syncthreads();
    StoreTile<Cfg::kWarpsK, Cfg::kBlockT, Cfg::kBlockN>(&tile_sums[0][0][0], Cfg::kPitch, Cfg::kBlockT * Cfg::kPitch,
                                                        args, unit.token_begin, unit.token_count, unit.row0,
                                                        lhs_scale, threadIdx.x, Cfg::kThreads);
    __syncthreads();  // the next unit reuses tile_sums
  }
  ZeroUnownedRows(args, table.row_start[0], table.row_start[num_experts]);
}

}  // namespace w4afp8::gemm
