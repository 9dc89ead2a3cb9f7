// The streaming family (exact) for decode: every warp owns whole units (16 kMTiles weight
// rows x 8 kTTiles tokens, all of K) and walks its units as one continuous stream of K
// groups. cp.async keeps kStages - 1 groups of operands in flight per warp in a lane-private
// shared-memory ring, across unit boundaries, so no warp ever waits for a block barrier or for
// a pipeline to refill.
#pragma once

#include "epilogue.cuh"
#include "mma.cuh"
#include "schedule.cuh"

namespace w4afp8::gemm {

template <int kMTiles_, int kTTiles_, int kStages_, int kWarpsK_ = 1>
struct StreamConfig {
  static constexpr const char* kFamily = "stream";
  static constexpr bool kExact = true;
  static constexpr int kMTiles = kMTiles_;
  static constexpr int kTTiles = kTTiles_;
  static constexpr int kStages = kStages_;
  static constexpr int kWarps = 4;
  // 1: every warp owns whole units. kWarps: the block's warps split each unit's K groups
  // (decode with few units: more warps, and more bytes in flight, per unit); their partial
  // sums meet in a shared float tile.
  static constexpr int kWarpsK = kWarpsK_;
  static_assert(kWarpsK == 1 || kWarpsK == kWarps, "split K over all of the block's warps or none");
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kBlockT = 8 * kTTiles;
  static constexpr int kRows = 16 * kMTiles;
  static constexpr int kTokens = kBlockT;
  static constexpr int kPitch = kRows + 8;        // bf16 tile of one warp; see StageAccumulators
  static constexpr int kSplitPitch = kRows + 4;   // float partial tiles of a split unit
  static constexpr int kStageBytes = LaneStage<StreamConfig>::kBytes;
  static constexpr int kEpilogueBytes = kWarpsK > 1 ? 0 : kBlockT * kPitch * 2;
  static constexpr int kWarpBytes = kStages * kStageBytes + kEpilogueBytes;
  static constexpr int kSplitBytes = kWarpsK > 1 ? kWarpsK * kBlockT * kSplitPitch * 4 : 0;
  static constexpr int kSmemBytes = kWarps * kWarpBytes + kSplitBytes;
  static std::string Name() {
    return "stream_" + std::to_string(kRows) + "x" + std::to_string(kBlockT) +
           (kWarpsK > 1 ? "_k" + std::to_string(kWarpsK) : std::string()) + "_s" + std::to_string(kStages);
  }
};

// One side (copy or compute) of a warp's walk over its (unit, K group) steps: units
// first_unit, first_unit + unit_stride, ..., each with the warp's K groups k_first,
// k_first + k_stride, ... (groups of them) in order.
template <class Cfg, class Table>
struct StreamCursor {
  const GroupedGemmArgs& args;
  const Table& table;
  int64_t first_unit, unit_stride, row_blocks;
  int groups, k_first, lane;
  int64_t step = 0;
  int group = 0;
  Unit unit;
  WarpOperands<Cfg> ops;

  __device__ int k_group() const { return k_first + group * Cfg::kWarpsK; }

  __device__ void Locate() {
    unit = LocateUnit<UnitOrder::kTokenTilesFastest>(table, first_unit + (step / groups) * unit_stride,
                                                     static_cast<int>(args.experts), row_blocks, Cfg::kRows);
    ops.Point(args, unit.expert, unit.row0, unit.token_begin, unit.token_count, lane);
  }

  // The next step; crossing into a new unit locates it (when steps remain).
  __device__ void Advance(int64_t steps) {
    ++step;
    if (++group == groups) {
      group = 0;
      if (step < steps) Locate();
    }
  }
};

template <class Cfg>
__global__ void __launch_bounds__(Cfg::kThreads) GroupedGemmStreamKernel(GroupedGemmArgs layer_args) {
  const GroupedGemmArgs args = SelectLayer(layer_args);
  using Table = TileTable<Cfg::kThreads, Cfg::kBlockT>;
  using Stage = LaneStage<Cfg>;
  constexpr bool kSplit = Cfg::kWarpsK > 1;
  __shared__ Table table;
  extern __shared__ __align__(16) uint8_t stream_smem[];
  table.Build(args);

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  uint8_t* ring = stream_smem + warp * Cfg::kWarpBytes;
  __nv_bfloat16* epilogue = reinterpret_cast<__nv_bfloat16*>(ring + Cfg::kStages * Cfg::kStageBytes);
  float* partials = reinterpret_cast<float*>(stream_smem + Cfg::kWarps * Cfg::kWarpBytes);

  const int groups = static_cast<int>(args.k / kGroupSize);
  const int warp_k = kSplit ? warp : 0;
  const int my_groups = groups > warp_k ? (groups - warp_k + Cfg::kWarpsK - 1) / Cfg::kWarpsK : 0;
  const int64_t row_blocks = (args.n + Cfg::kRows - 1) / Cfg::kRows;
  const int64_t units = static_cast<int64_t>(table.total_tiles(static_cast<int>(args.experts))) * row_blocks;
  const int unit_warps = kSplit ? 1 : Cfg::kWarps;  // unit owners per block
  const int64_t first_unit = static_cast<int64_t>(blockIdx.x) * unit_warps + (kSplit ? 0 : warp);
  const int64_t unit_stride = static_cast<int64_t>(gridDim.x) * unit_warps;
  const int64_t my_units = first_unit < units ? (units - first_unit + unit_stride - 1) / unit_stride : 0;
  const int64_t steps = my_units * my_groups;
  const float lhs_scale = *args.lhs_scale;

  float acc[Cfg::kMTiles][Cfg::kTTiles][4] = {};
  const auto finish_unit = [&](const Unit& unit) {
    if constexpr (kSplit) {  // every warp of the block, every unit, even with no K groups
      StageAccumulators(partials + warp * Cfg::kBlockT * Cfg::kSplitPitch, Cfg::kSplitPitch, 0, acc, lhs_scale,
                        lane);
      __syncthreads();
      StoreTile<Cfg::kWarpsK, Cfg::kBlockT, Cfg::kRows>(partials, Cfg::kSplitPitch, Cfg::kBlockT * Cfg::kSplitPitch,
                                                         args, unit.token_begin, unit.token_count, unit.row0,
                                                         lhs_scale, threadIdx.x, Cfg::kThreads);
      __syncthreads();  // the next unit reuses the partial tiles
    } else {
      StageAccumulators(epilogue, Cfg::kPitch, 0, acc, lhs_scale, lane);
      __syncwarp();
      StoreTile<1, Cfg::kBlockT, Cfg::kRows>(epilogue, Cfg::kPitch, 0, args, unit.token_begin, unit.token_count,
                                             unit.row0, lhs_scale, lane, 32);
      __syncwarp();
    }
  };

  if (my_groups == 0) {  // a split-K warp left without K groups (K < kWarpsK groups) still meets its barriers
    for (int64_t u = 0; u < my_units; ++u) {
      finish_unit(LocateUnit<UnitOrder::kTokenTilesFastest>(table, first_unit + u * unit_stride,
                                                            static_cast<int>(args.experts), row_blocks, Cfg::kRows));
    }
  } else {
    // The copy side runs kStages - 1 steps ahead of the compute side.
    StreamCursor<Cfg, Table> loading{args, table, first_unit, unit_stride, row_blocks, my_groups, warp_k, lane};
    StreamCursor<Cfg, Table> computing{args, table, first_unit, unit_stride, row_blocks, my_groups, warp_k, lane};
    if (steps > 0) {
      loading.Locate();
      computing.Locate();
    }
    const auto issue_next = [&]() {
      if (loading.step < steps) {
        Stage::Issue(ring + (loading.step % Cfg::kStages) * Cfg::kStageBytes, loading.ops, loading.k_group(), lane);
        loading.Advance(steps);
      }
      CommitAsync();  // empty groups keep the wait count uniform
    };
#pragma unroll 1
    for (int s = 0; s < Cfg::kStages - 1; ++s) issue_next();

    while (computing.step < steps) {
      WaitAsync<Cfg::kStages - 2>();
      GroupFragments<Cfg> f;
      Stage::Read(ring + (computing.step % Cfg::kStages) * Cfg::kStageBytes, lane, f);
      AccumulateGroup<Cfg>(f, acc);
      issue_next();  // refills the slot read one step ago (this lane's own reads of it have completed)
      if (computing.group + 1 == my_groups) finish_unit(computing.unit);
      computing.Advance(steps);
    }
  }
  WaitAsync<0>();
  ZeroUnownedRows(args, table.row_start[0], table.row_start[args.experts]);
}

}  // namespace w4afp8::gemm
