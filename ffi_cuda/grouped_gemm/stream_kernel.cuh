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

template <int kMTiles_, int kTTiles_, int kStages_>
struct StreamConfig {
  static constexpr const char* kFamily = "stream";
  static constexpr bool kExact = true;
  static constexpr int kMTiles = kMTiles_;
  static constexpr int kTTiles = kTTiles_;
  static constexpr int kStages = kStages_;
  static constexpr int kWarps = 4;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kBlockT = 8 * kTTiles;
  static constexpr int kRows = 16 * kMTiles;
  static constexpr int kTokens = kBlockT;
  static constexpr int kPitch = kRows + 8;  // bf16; see StageAccumulators
  static constexpr int kStageBytes = LaneStage<StreamConfig>::kBytes;
  static constexpr int kEpilogueBytes = kBlockT * kPitch * 2;
  static constexpr int kWarpBytes = kStages * kStageBytes + kEpilogueBytes;
  static constexpr int kSmemBytes = kWarps * kWarpBytes;
  static std::string Name() {
    return "stream_" + std::to_string(kRows) + "x" + std::to_string(kBlockT) + "_s" + std::to_string(kStages);
  }
};

// One side (copy or compute) of a warp's walk over its (unit, K group) steps: units
// first_unit, first_unit + unit_stride, ..., each all K groups in order.
template <class Cfg, class Table>
struct StreamCursor {
  const GroupedGemmArgs& args;
  const Table& table;
  int64_t first_unit, unit_stride, row_blocks;
  int groups, lane;
  int64_t step = 0;
  int group = 0;
  Unit unit;
  WarpOperands<Cfg> ops;

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
  BeginKernel();
  const GroupedGemmArgs args = SelectLayer(layer_args);
  using Table = TileTable<Cfg::kThreads, Cfg::kBlockT>;
  using Stage = LaneStage<Cfg>;
  __shared__ Table table;
  extern __shared__ __align__(16) uint8_t stream_smem[];
  table.Build(args);

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  uint8_t* ring = stream_smem + warp * Cfg::kWarpBytes;
  __nv_bfloat16* epilogue = reinterpret_cast<__nv_bfloat16*>(ring + Cfg::kStages * Cfg::kStageBytes);

  const int groups = static_cast<int>(args.k / kGroupSize);
  const int64_t row_blocks = (args.n + Cfg::kRows - 1) / Cfg::kRows;
  const int64_t units = static_cast<int64_t>(table.total_tiles(static_cast<int>(args.experts))) * row_blocks;
  const int64_t first_unit = static_cast<int64_t>(blockIdx.x) * Cfg::kWarps + warp;
  const int64_t unit_stride = static_cast<int64_t>(gridDim.x) * Cfg::kWarps;
  const int64_t my_units = first_unit < units ? (units - first_unit + unit_stride - 1) / unit_stride : 0;
  const int64_t steps = my_units * groups;
  const float lhs_scale = *args.lhs_scale;

  // The copy side runs kStages - 1 steps ahead of the compute side.
  StreamCursor<Cfg, Table> loading{args, table, first_unit, unit_stride, row_blocks, groups, lane};
  StreamCursor<Cfg, Table> computing{args, table, first_unit, unit_stride, row_blocks, groups, lane};
  if (steps > 0) {
    loading.Locate();
    computing.Locate();
  }
  const auto issue_next = [&]() {
    if (loading.step < steps) {
      Stage::Issue(ring + (loading.step % Cfg::kStages) * Cfg::kStageBytes, loading.ops, loading.group, lane);
      loading.Advance(steps);
    }
    CommitAsync();  // empty groups keep the wait count uniform
  };
#pragma unroll 1
  for (int s = 0; s < Cfg::kStages - 1; ++s) issue_next();

  float acc[Cfg::kMTiles][Cfg::kTTiles][4] = {};
  while (computing.step < steps) {
    WaitAsync<Cfg::kStages - 2>();
    GroupFragments<Cfg> f;
    Stage::Read(ring + (computing.step % Cfg::kStages) * Cfg::kStageBytes, lane, f);
    AccumulateGroup<Cfg>(f, acc);
    issue_next();  // refills the slot read one step ago (this lane's own reads of it have completed)

    if (computing.group + 1 == groups) {  // unit done
      StageAccumulators(epilogue, Cfg::kPitch, 0, acc, lhs_scale, lane);
      __syncwarp();
      StoreTile<1, Cfg::kBlockT, Cfg::kRows>(epilogue, Cfg::kPitch, 0, args, computing.unit.token_begin,
                                             computing.unit.token_count, computing.unit.row0, lhs_scale, lane, 32);
      __syncwarp();
    }
    computing.Advance(steps);
  }
  WaitAsync<0>();
  ZeroUnownedRows(args, table.row_start[0], table.row_start[args.experts]);
}

}  // namespace w4afp8::gemm
