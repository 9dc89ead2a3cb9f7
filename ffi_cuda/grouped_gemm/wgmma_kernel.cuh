// The wgmma family (inexact, precision=DEFAULT only) for prefill. The exact families run f16
// mma.sync (sm_90 has no native fp8 mma.sync, docs/performance.md), so the fp8 tensor-core rate
// is reachable only through wgmma. Each K group's int4 weights are converted once per
// block into an fp8 tile in shared memory, and two warpgroups multiply 64 weight rows each by
// the 128 tokens of the unit (wgmma m64n128k32, both operands K-major from shared memory in the
// 128-byte swizzle). The conversion of the next group overlaps the asynchronous MMAs of the
// current one. Hopper's fp8 wgmma adds the products of one instruction with about 14 bits of
// alignment precision, so this family is not the exact f32 math.
#pragma once

#include "epilogue.cuh"
#include "mma.cuh"
#include "schedule.cuh"

namespace w4afp8::gemm {

struct WgmmaConfig {
  static constexpr const char* kFamily = "wgmma";
  static constexpr bool kExact = false;
  static constexpr int kStages = 4;
  static constexpr int kWarps = 8;  // two warpgroups
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kRows = 128;
  static constexpr int kTokens = 128;  // the wgmma N
  static constexpr int kBlockT = kTokens;
  static constexpr int kWarpRows = 16;
  static constexpr int kFp8WeightBytes = kRows * kGroupSize;
  static constexpr int kPitch = kWarpRows + 8;  // bf16; see StageAccumulators
  static constexpr int kStagingBytes = kTokens * kPitch * 2;
  static std::string Name() { return "wgmma_128x128_s" + std::to_string(kStages); }
};

// One stage of the block's cp.async ring, for the copy side and the compute side alike: the
// int4 weight chunks in lane order (chunk c: tile c / 64, half (c / 32) % 2, lane c % 32), the
// activations row-major with 16-byte chunks XOR-swizzled by token % 8 (the wgmma 128-byte
// swizzle), and one scale per weight row.
template <class Cfg>
struct BlockStage {
  static constexpr int kWeightBytes = Cfg::kRows * kGroupSize / 2;
  static constexpr int kActBytes = Cfg::kTokens * kGroupSize;
  static constexpr int kActs = kWeightBytes;
  static constexpr int kScales = kWeightBytes + kActBytes;
  // wgmma operand tiles start on 1024 bytes (the 8-row swizzle atom).
  static constexpr int kBytes = (kScales + Cfg::kRows * 4 + 1023) / 1024 * 1024;
  __device__ static constexpr int WeightChunk(int c) { return c * 16; }
  __device__ static constexpr int ActChunk(int token, int chunk) {
    return kActs + token * kGroupSize + ((chunk ^ (token % 8)) * 16);
  }
};

template <class Cfg>
constexpr int WgmmaSmemBytes() {
  return 1024 + Cfg::kStages * BlockStage<Cfg>::kBytes + 2 * Cfg::kFp8WeightBytes + Cfg::kWarps * Cfg::kStagingBytes;
}

// The copy side of the block's ring: it walks the block's (unit, K group) steps, kept
// kStages - 1 steps ahead of the compute side by the caller. Each thread copies fixed 16-byte
// chunks of every stage; their sources are found once per unit, so a step only adds the
// group's offset.
template <class Cfg>
struct BlockLoader {
  using Stage = BlockStage<Cfg>;
  static constexpr int kWeightChunks = Cfg::kRows * 4 / Cfg::kThreads;  // 64 per 16-row tile
  static constexpr int kActChunks = Cfg::kTokens * 8 / Cfg::kThreads;   // 8 per token
  static_assert(Cfg::kRows * 4 % Cfg::kThreads == 0 && Cfg::kTokens * 8 % Cfg::kThreads == 0, "");
  const uint8_t* weight_src[kWeightChunks];
  const uint8_t* act_src[kActChunks];
  const float* scale_src;
  bool weight_valid[kWeightChunks];
  bool act_valid[kActChunks];
  bool scale_valid;
  int64_t step = 0;
  int group = 0;

  __device__ __forceinline__ void Point(const GroupedGemmArgs& args, const Unit& unit) {
#pragma unroll
    for (int i = 0; i < kWeightChunks; ++i) {
      const int c = threadIdx.x + i * Cfg::kThreads, tile = c / 64, half = (c / 32) % 2, lane = c % 32;
      const int64_t tile_row = unit.row0 + tile * 16;
      weight_valid[i] = tile_row < args.n;
      weight_src[i] = WeightLaneBase(args, unit.expert, weight_valid[i] ? tile_row : 0, half, lane);
    }
#pragma unroll
    for (int i = 0; i < kActChunks; ++i) {
      const int c = threadIdx.x + i * Cfg::kThreads, token = c / 8, chunk = c % 8;
      act_valid[i] = token < unit.token_count;
      act_src[i] = args.lhs + (act_valid[i] ? unit.token_begin + token : 0) * args.k + chunk * 16;
    }
    const int64_t row = unit.row0 + threadIdx.x;
    scale_valid = threadIdx.x < Cfg::kRows && row < args.n;
    scale_src = args.scales + (unit.expert * args.n + (scale_valid ? row : 0)) * (args.k / kGroupSize);
  }

  template <class Table>
  __device__ __forceinline__ void IssueNext(const GroupedGemmArgs& args, const Table& table, uint8_t* ring,
                                            int64_t steps, int groups, int64_t row_blocks) {
    if (step < steps) {
      if (group == 0) {
        Point(args, LocateUnit<UnitOrder::kRowBlocksFastest>(table, blockIdx.x + (step / groups) * gridDim.x,
                                                             static_cast<int>(args.experts), row_blocks, Cfg::kRows));
      }
      uint8_t* stage = ring + (step % Cfg::kStages) * Stage::kBytes;
      const int64_t weight_offset = group * WeightGroupStride(args);
#pragma unroll
      for (int i = 0; i < kWeightChunks; ++i) {
        CopyAsync16(stage + Stage::WeightChunk(threadIdx.x + i * Cfg::kThreads), weight_src[i] + weight_offset,
                    weight_valid[i]);
      }
#pragma unroll
      for (int i = 0; i < kActChunks; ++i) {
        const int c = threadIdx.x + i * Cfg::kThreads;
        CopyAsync16(stage + Stage::ActChunk(c / 8, c % 8), act_src[i] + group * kGroupSize, act_valid[i]);
      }
      if (threadIdx.x < Cfg::kRows) {
        CopyAsync4(stage + Stage::kScales + threadIdx.x * 4, scale_src + group, scale_valid);
      }
      ++step;
      if (++group == groups) group = 0;
    }
    CommitAsync();  // empty groups keep the wait count uniform
  }
};

// A stage's int4 lane chunks -> the fp8 weight tile, row-major 128 bytes per row, 16-byte
// chunks swizzled by row % 8.
template <class Cfg>
__device__ __forceinline__ void ConvertStageWeights(const uint8_t* stage, uint8_t* fp8_weights) {
#pragma unroll
  for (int i = 0; i < Cfg::kRows * 4 / Cfg::kThreads; ++i) {
    const int c = threadIdx.x + i * Cfg::kThreads, tile = c / 64, half = (c / 32) % 2, lane = c % 32;
    const int row = tile * 16 + lane / 4 + 8 * half, t = lane % 4;
    const uint4 w = *reinterpret_cast<const uint4*>(stage + BlockStage<Cfg>::WeightChunk(c));
    uint4 lo, hi;
    Int4ToE4m3(w.x, lo.x, lo.y);
    Int4ToE4m3(w.y, lo.z, lo.w);
    Int4ToE4m3(w.z, hi.x, hi.y);
    Int4ToE4m3(w.w, hi.z, hi.w);
    uint8_t* dst = fp8_weights + row * kGroupSize;
    *reinterpret_cast<uint4*>(dst + (((2 * t) ^ (row % 8)) * 16)) = lo;
    *reinterpret_cast<uint4*>(dst + (((2 * t + 1) ^ (row % 8)) * 16)) = hi;
  }
  FenceProxyAsync();
}

template <class Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, 1) GroupedGemmWgmmaKernel(GroupedGemmArgs layer_args) {
  BeginKernel();
  const GroupedGemmArgs args = SelectLayer(layer_args);
  using Stage = BlockStage<Cfg>;
  __shared__ TileTable<Cfg::kThreads, Cfg::kBlockT> table;
  extern __shared__ uint8_t wgmma_smem_unaligned[];
  uint8_t* ring = reinterpret_cast<uint8_t*>(
      (reinterpret_cast<uintptr_t>(wgmma_smem_unaligned) + 1023) / 1024 * 1024);
  uint8_t* fp8_weights = ring + Cfg::kStages * Stage::kBytes;  // two buffers
  table.Build(args);

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4;
  const int warpgroup = warp / 4;
  const int warp_row0 = warp * Cfg::kWarpRows;  // rows 16w .. 16w + 15 of the block tile
  __nv_bfloat16* staging =
      reinterpret_cast<__nv_bfloat16*>(fp8_weights + 2 * Cfg::kFp8WeightBytes + warp * Cfg::kStagingBytes);

  const int num_experts = static_cast<int>(args.experts);
  const int groups = static_cast<int>(args.k / kGroupSize);
  const int64_t row_blocks = (args.n + Cfg::kRows - 1) / Cfg::kRows;
  const int64_t units = static_cast<int64_t>(table.total_tiles(num_experts)) * row_blocks;
  const int64_t my_units = blockIdx.x < units ? (units - blockIdx.x + gridDim.x - 1) / gridDim.x : 0;
  const int64_t steps = my_units * groups;
  const float lhs_scale = *args.lhs_scale;

  BlockLoader<Cfg> loader;
#pragma unroll 1
  for (int s = 0; s < Cfg::kStages - 1; ++s) loader.IssueNext(args, table, ring, steps, groups, row_blocks);
  if (steps > 0) {
    WaitAsync<Cfg::kStages - 2>();
    ConvertStageWeights<Cfg>(ring, fp8_weights);
    __syncthreads();
  }

  float acc[1][16][4] = {};  // the MMA accumulator layout of the warp's 16 rows x 128 tokens
  float group_sum[64];       // one K group in the wgmma accumulator layout
  Unit computing{};
  int compute_group = 0;
  for (int64_t step = 0; step < steps; ++step) {
    if (compute_group == 0) {
      computing = LocateUnit<UnitOrder::kRowBlocksFastest>(table, blockIdx.x + (step / groups) * gridDim.x,
                                                           num_experts, row_blocks, Cfg::kRows);
    }
    const uint8_t* stage = ring + (step % Cfg::kStages) * Stage::kBytes;
    const uint64_t a = SwizzledTileDescriptor(fp8_weights + (step % 2) * Cfg::kFp8WeightBytes +
                                              warpgroup * 64 * kGroupSize);
    const uint64_t b = SwizzledTileDescriptor(stage + Stage::kActs);  // + 2 per k32: 32 bytes on
    const float* scales = reinterpret_cast<const float*>(stage + Stage::kScales);
    const float scale_lo = scales[warp_row0 + g], scale_hi = scales[warp_row0 + g + 8];
    WgmmaFence();
#pragma unroll
    for (int k32 = 0; k32 < 4; ++k32) WgmmaE4m3(group_sum, a + 2 * k32, b + 2 * k32, k32);
    WgmmaCommit();

    // While the MMAs run: the next group's operands are complete, refill the ring, convert.
    WaitAsync<Cfg::kStages - 3>();
    __syncthreads();
    loader.IssueNext(args, table, ring, steps, groups, row_blocks);
    if (step + 1 < steps) {
      ConvertStageWeights<Cfg>(ring + ((step + 1) % Cfg::kStages) * Stage::kBytes,
                               fp8_weights + ((step + 1) % 2) * Cfg::kFp8WeightBytes);
    }

    WgmmaWait<0>();
    PromoteGroup<Cfg::kTokens>(group_sum, scale_lo, scale_hi, acc);
    __syncthreads();  // every warpgroup is done with this fp8 tile and the converted next one is complete

    if (++compute_group < groups) continue;
    compute_group = 0;
    StageAccumulators(staging, Cfg::kPitch, 0, acc, lhs_scale, lane);
    __syncwarp();
    StoreTile<1, Cfg::kTokens, Cfg::kWarpRows>(staging, Cfg::kPitch, 0, args, computing.token_begin,
                                               computing.token_count, computing.row0 + warp_row0, lhs_scale, lane, 32);
    __syncwarp();
  }
  WaitAsync<0>();
  ZeroUnownedRows(args, table.row_start[0], table.row_start[num_experts]);
}

}  // namespace w4afp8::gemm
