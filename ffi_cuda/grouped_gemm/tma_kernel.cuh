// The TMA family (inexact, precision=DEFAULT), decode to prefill: warp-specialized, with the
// copy engine feeding fp8 wgmma.
//
// A block is three warpgroups. Warpgroup 0 copies: one warp per MMA warpgroup walks that
// warpgroup's (unit, K group) steps and fills its ring of kStages shared-memory stages with
// bulk tensor copies (TMA) of the 64 x 128 int4 weight tile and the kTokens x 128 fp8
// activation tile, plus cp.async copies of the 64 group scales, all completing on the stage's
// `full` mbarrier. Warpgroups 1 and 2 each own whole units (64 weight rows x kTokens tokens x
// all of K) and walk them as one stream of K groups: convert the stage's int4 to e4m3 in
// registers (the wgmma A fragment; the next stage's conversion overlaps the current MMAs),
// four register-sourced m64nTk32 wgmmas from zero, promote the group's sum into the f32
// accumulators with its scale (the seed's and DeepGEMM's numerics), release the stage on its
// `empty` mbarrier. Tokens are the wgmma N side (swap-AB), so one family covers 8 tokens per
// expert to prefill.
//
// The copies land 128-byte swizzled (64-byte for the checkpoint layout), which keeps every
// lane's two-byte fragment reads free of bank conflicts and is the swizzle the wgmma B
// descriptor reads the activations with.
#pragma once

#include <cuda.h>

#include "epilogue.cuh"
#include "mma.cuh"
#include "schedule.cuh"

namespace w4afp8::gemm {

// One launch's arguments with the copy engine's descriptors (built on the host in
// grouped_gemm.cu): the packed int4 weights of every layer and expert, and lhs.
struct TmaGemmParams {
  GroupedGemmArgs args;
  // Tiled layout: [L*E*N/16 tiles][K/128 groups][8 lines][128 bytes], boxes of one group of 4
  // tiles; checkpoint layout: [L*E*N rows][K/2 bytes], boxes of 64 bytes x 64 rows.
  CUtensorMap weights;
  CUtensorMap lhs;  // fp8 [R, K], boxes of 128 bytes x kTokens rows
};

template <int kTokens_, int kStages_>
struct TmaConfig {
  static constexpr const char* kFamily = "tma";
  static constexpr bool kExact = false;
  static constexpr int kTokens = kTokens_;  // the wgmma N
  static constexpr int kBlockT = kTokens;
  static constexpr int kStages = kStages_;
  static constexpr int kConsumers = 2;  // MMA warpgroups, each with its own units and ring
  static constexpr int kThreads = 128 * (1 + kConsumers);
  static constexpr int kRows = 64;  // weight rows per unit: one wgmma M
  static constexpr int kWeightBytes = kRows * kGroupSize / 2;
  static constexpr int kActBytes = kTokens * kGroupSize;
  static constexpr int kStageBytes = kWeightBytes + kActBytes;  // whole 1 KiB swizzle atoms
  static constexpr int kPitch = 16 + 8;                          // bf16 staging of a warp's 16 rows
  static constexpr int kStagingBytes = kTokens * kPitch * 2;
  // Prefill: units sharing a token tile run together (its activations outweigh an expert's
  // weights per unit); below, units sharing an expert's weights do.
  static constexpr UnitOrder kOrder = kTokens >= 128 ? UnitOrder::kRowBlocksFastest : UnitOrder::kTokenTilesFastest;
  static_assert(kTokens % 8 == 0 && kTokens <= 128 && kStageBytes % 1024 == 0, "");
  static std::string Name() { return "tma_64x" + std::to_string(kTokens) + "_s" + std::to_string(kStages); }
};

// Dynamic shared memory: the rings, the scales, the barriers and the epilogue staging.
template <class Cfg>
struct TmaSmem {
  static constexpr int kRings = 0;
  static constexpr int kScales = kRings + Cfg::kConsumers * Cfg::kStages * Cfg::kStageBytes;
  static constexpr int kBarriers = kScales + Cfg::kConsumers * Cfg::kStages * Cfg::kRows * 4;
  static constexpr int kStaging = kBarriers + 2 * Cfg::kConsumers * Cfg::kStages * 8;
  static constexpr int kBytes = 1024 + kStaging + 4 * Cfg::kConsumers * Cfg::kStagingBytes;  // + base alignment
};

template <class Cfg>
constexpr int TmaSmemBytes() {
  return TmaSmem<Cfg>::kBytes;
}

// One MMA warpgroup's view of its ring.
template <class Cfg>
struct Ring {
  uint8_t* stages;
  float* scales;   // [kStages][kRows]
  uint64_t* full;  // [kStages]: copies landed (1 expect_tx arrival + 32 cp.async arrivals)
  uint64_t* empty; // [kStages]: the 4 MMA warps are done with the stage

  __device__ Ring(uint8_t* smem, int consumer) {
    using S = TmaSmem<Cfg>;
    stages = smem + S::kRings + consumer * Cfg::kStages * Cfg::kStageBytes;
    scales = reinterpret_cast<float*>(smem + S::kScales) + consumer * Cfg::kStages * Cfg::kRows;
    full = reinterpret_cast<uint64_t*>(smem + S::kBarriers) + consumer * 2 * Cfg::kStages;
    empty = full + Cfg::kStages;
  }
  __device__ uint8_t* stage(int s) const { return stages + s * Cfg::kStageBytes; }
};

// Where a warpgroup's steps come from: units worker, worker + workers, ..., all K groups each.
template <class Cfg, class Table>
struct TmaSchedule {
  const Table& table;
  int num_experts;
  int64_t row_blocks;
  int64_t units;
  int worker;
  int workers;
  __device__ int64_t my_units() const {
    return worker < units ? (units - worker + workers - 1) / workers : 0;
  }
  __device__ Unit locate(int64_t i) const {
    return LocateUnit<Cfg::kOrder>(table, worker + i * workers, num_experts, row_blocks, Cfg::kRows);
  }
};

// The copy warp of one MMA warpgroup.
template <class Cfg, bool kTiled, class Table>
__device__ __forceinline__ void ProduceSteps(const TmaGemmParams& p, const GroupedGemmArgs& args,
                                             const TmaSchedule<Cfg, Table>& schedule, const Ring<Cfg>& ring,
                                             int64_t layer, int lane) {
  const int groups = static_cast<int>(args.k / kGroupSize);
  const int64_t units = schedule.my_units();
  int stage = 0;
  uint32_t phase = 0;
  for (int64_t i = 0; i < units; ++i) {
    const Unit unit = schedule.locate(i);
    // The unit's first weight row in the [L*E*N] rows of the whole stack.
    const int64_t stack_row = (layer * args.experts + unit.expert) * args.n + unit.row0;
    const float* scale_src[2];
    bool scale_valid[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t row = unit.row0 + lane + 32 * h;
      scale_valid[h] = row < args.n;
      scale_src[h] = args.scales + (unit.expert * args.n + (scale_valid[h] ? row : 0)) * groups;
    }
    for (int group = 0; group < groups; ++group) {
      MbarrierWait(ring.empty + stage, phase ^ 1);
      uint8_t* dst = ring.stage(stage);
      if (lane == 0) {
        MbarrierArriveExpectTx(ring.full + stage, Cfg::kStageBytes);
        if constexpr (kTiled) {
          TmaLoad4d(dst, &p.weights, ring.full + stage, 0, 0, group, static_cast<int>(stack_row / 16));
        } else {
          TmaLoad2d(dst, &p.weights, ring.full + stage, group * (kGroupSize / 2), static_cast<int>(stack_row));
        }
        TmaLoad2d(dst + Cfg::kWeightBytes, &p.lhs, ring.full + stage, group * kGroupSize,
                  static_cast<int>(unit.token_begin));
      }
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        CopyAsync4(ring.scales + stage * Cfg::kRows + lane + 32 * h, scale_src[h] + group, scale_valid[h]);
      }
      CopyAsyncArriveNoinc(ring.full + stage);
      if (++stage == Cfg::kStages) stage = 0, phase ^= 1;
    }
  }
}

// Byte offsets, in a stage's weight tile, of the two-byte pieces lane (g, t) of MMA warp `warp`
// needs for instruction j (K 32j .. 32j + 31 of the group): for row r = 16 warp + 8h + g, the
// int4 pairs of K 32j + 4t .. + 3 (the fragment's a[h]) are bytes 2t, 2t + 1 of the row's
// 16-byte chunk j, those of K 32j + 16 + 4t .. + 3 (a[2 + h]) bytes 8 + 2t, 9 + 2t.
template <bool kTiled>
__device__ __forceinline__ int FragmentOffset(int warp, int lane, int h, int j) {
  const int g = lane / 4, t = lane % 4;
  if constexpr (kTiled) {
    // Tile `warp` is 1 KiB of 8 lines: line 4h + g / 2 holds rows 8h + g (chunks 4 (g % 2) + j),
    // 16-byte chunks XOR-swizzled by the line.
    const int line = 4 * h + g / 2;
    return warp * 1024 + line * 128 + (((4 * (g % 2) + j) ^ line) * 16) + 2 * t;
  } else {
    // Rows of 64 bytes, 16-byte chunks XOR-swizzled by (row / 2) % 4 (the 64-byte swizzle).
    const int row = 16 * warp + 8 * h + g;
    return row * 64 + ((j ^ ((row >> 1) & 3)) * 16) + 2 * t;
  }
}

// The stage's int4 weights (at shared address `weights`) as this lane's e4m3 A fragments of
// the group's four wgmmas.
__device__ __forceinline__ void LoadFragments(uint32_t weights, const int (&offsets)[2][4], uint32_t (&a)[4][4]) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
#pragma unroll
    for (int j = 0; j < 4; ++j) Int4ToE4m3(LoadSharedHalves(weights + offsets[h][j]), a[j][h], a[j][2 + h]);
  }
}

// One MMA warpgroup: its units, group by group, then each unit's epilogue.
template <class Cfg, bool kTiled, class Table>
__device__ __forceinline__ void ConsumeSteps(const GroupedGemmArgs& args, const TmaSchedule<Cfg, Table>& schedule,
                                             const Ring<Cfg>& ring, __nv_bfloat16* staging, int warp, int lane) {
  constexpr int kT = Cfg::kTokens;
  const int g = lane / 4;
  const int groups = static_cast<int>(args.k / kGroupSize);
  const int64_t steps = schedule.my_units() * groups;
  if (steps == 0) return;
  int offsets[2][4];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
#pragma unroll
    for (int j = 0; j < 4; ++j) offsets[h][j] = FragmentOffset<kTiled>(warp, lane, h, j);
  }
  const float lhs_scale = *args.lhs_scale;

  uint32_t a[2][4][4];      // this group's fragments and the next group's
  float group_sum[kT / 2];  // one group's wgmma sums (the accumulator layout)
  float acc[1][kT / 8][4] = {};
  // Counters, not divisions of the step index: a 64-bit division per step costs more than
  // the step's conversion.
  int64_t unit_index = 0;
  Unit unit = schedule.locate(0);
  int group = 0;
  int stage = 0;
  uint32_t phase = 0;
  const uint32_t stages = SharedAddress(ring.stages), scales = SharedAddress(ring.scales);
  MbarrierWait(ring.full, 0);
  LoadFragments(stages, offsets, a[0]);

  const auto step = [&](int64_t s, uint32_t(&current)[4][4], uint32_t(&next)[4][4]) {
    const uint64_t b = SwizzledTileDescriptor(ring.stage(stage) + Cfg::kWeightBytes);  // + 2 per k32: 32 bytes on
    WgmmaFence();
#pragma unroll
    for (int j = 0; j < 4; ++j) WgmmaE4m3RegA<kT>(group_sum, current[j], b + 2 * j, j);
    WgmmaCommit();
    // While the MMAs run: wait for the next stage and convert its weights.
    const int next_stage = stage + 1 == Cfg::kStages ? 0 : stage + 1;
    const uint32_t next_phase = next_stage == 0 ? phase ^ 1 : phase;
    if (s + 1 < steps) {
      MbarrierWait(ring.full + next_stage, next_phase);
      LoadFragments(stages + next_stage * Cfg::kStageBytes, offsets, next);
    }
    WgmmaWait<0>();
    const uint32_t row_scales = scales + (stage * Cfg::kRows + 16 * warp + g) * 4;
    PromoteGroup<kT>(group_sum, LoadSharedF32(row_scales), LoadSharedF32(row_scales + 8 * 4), acc);
    __syncwarp();
    if (lane == 0) MbarrierArrive(ring.empty + stage);
    stage = next_stage;
    phase = next_phase;
    if (++group == groups) {
      StageAccumulators(staging, Cfg::kPitch, 0, acc, lhs_scale, lane);
      __syncwarp();
      StoreTile<1, kT, 16>(staging, Cfg::kPitch, 0, args, unit.token_begin, unit.token_count,
                           unit.row0 + 16 * warp, lhs_scale, lane, 32);
      __syncwarp();
      group = 0;
      if (s + 1 < steps) unit = schedule.locate(++unit_index);
    }
  };
  // Two steps per iteration, so the fragment buffers are indexed by constants.
  for (int64_t s = 0; s < steps; s += 2) {
    step(s, a[0], a[1]);
    if (s + 1 < steps) step(s + 1, a[1], a[0]);
  }
}

template <class Cfg, bool kTiled, class Table>
__device__ __forceinline__ void TmaKernelBody(const TmaGemmParams& p, Table& table, uint8_t* smem) {
  const GroupedGemmArgs args = SelectLayer(p.args);
  const int64_t layer = p.args.layers > 1 ? min(max(static_cast<int64_t>(*p.args.layer), int64_t{0}), p.args.layers - 1)
                                          : 0;
  if (threadIdx.x == 0) {
    PrefetchTensorMap(&p.weights);
    PrefetchTensorMap(&p.lhs);
    for (int c = 0; c < Cfg::kConsumers; ++c) {
      const Ring<Cfg> ring(smem, c);
      for (int s = 0; s < Cfg::kStages; ++s) {
        MbarrierInit(ring.full + s, 1 + 32);
        MbarrierInit(ring.empty + s, 4);
      }
    }
    FenceBarrierInit();
  }
  table.Build(args);  // ends with __syncthreads: the barriers are initialized too

  const int num_experts = static_cast<int>(args.experts);
  const int64_t row_blocks = (args.n + Cfg::kRows - 1) / Cfg::kRows;
  const int64_t units = static_cast<int64_t>(table.total_tiles(num_experts)) * row_blocks;
  const int warpgroup = threadIdx.x / 128, warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32;
  const int workers = Cfg::kConsumers * static_cast<int>(gridDim.x);
  if (warpgroup == 0) {
    RegistersDecrease<56>();
    if (warp < Cfg::kConsumers) {
      const TmaSchedule<Cfg, Table> schedule{table, num_experts, row_blocks, units,
                                             static_cast<int>(blockIdx.x + warp * gridDim.x), workers};
      ProduceSteps<Cfg, kTiled>(p, args, schedule, Ring<Cfg>(smem, warp), layer, lane);
    }
    ZeroUnownedRows(args, table.row_start[0], table.row_start[num_experts]);
  } else {
    RegistersIncrease<224>();  // 2 x 128 x 224 + 128 x 56 registers: the whole file
    const int consumer = warpgroup - 1;
    const TmaSchedule<Cfg, Table> schedule{table, num_experts, row_blocks, units,
                                           static_cast<int>(blockIdx.x + consumer * gridDim.x), workers};
    __nv_bfloat16* staging = reinterpret_cast<__nv_bfloat16*>(smem + TmaSmem<Cfg>::kStaging +
                                                              (4 * consumer + warp) * Cfg::kStagingBytes);
    ConsumeSteps<Cfg, kTiled>(args, schedule, Ring<Cfg>(smem, consumer), staging, warp, lane);
    ZeroUnownedRows(args, table.row_start[0], table.row_start[num_experts]);
  }
}

template <class Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, 1) GroupedGemmTmaKernel(const __grid_constant__ TmaGemmParams p) {
  BeginKernel();
  __shared__ TileTable<Cfg::kThreads, Cfg::kBlockT> table;
  extern __shared__ uint8_t tma_smem_unaligned[];
  uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(tma_smem_unaligned) + 1023) / 1024 * 1024);
  if (p.args.tiled_weights) {
    TmaKernelBody<Cfg, true>(p, table, smem);
  } else {
    TmaKernelBody<Cfg, false>(p, table, smem);
  }
}

}  // namespace w4afp8::gemm
