// W4A8 grouped GEMM on warp-level fp8 tensor-core MMAs (mma.sync m16n8k32 e4m3).
//
// Weights are the MMA's 16-row A operand, tokens the 8-column B operand, so decode (a few
// tokens per expert) still fills whole MMAs along the weight rows. int4 -> e4m3 is exact and
// done with byte permutes; each 128-wide K group is summed on the tensor cores in f32 and then
// multiplied by its scale into an f32 accumulator.
//
// Work is split into units (expert, token tile of kBlockT rows, weight-row block of kBlockN).
// A persistent grid walks the units; every block derives the unit table from the offsets on
// the device, so the launch never depends on the routing (CUDA-graph safe). Warps of a block
// split the weight rows (kWarpsN) and the K groups (kWarpsK); split-K partial sums meet in
// shared memory, which also transposes the tile for 16-byte bf16 stores.
#include <cub/block/block_scan.cuh>

#include "grouped_gemm.h"

namespace w4afp8 {
namespace {

template <int kMTiles_, int kTTiles_, int kWarpsN_, int kWarpsK_, int kStages_>
struct TileConfig {
  static constexpr int kMTiles = kMTiles_;  // 16-row weight tiles per warp
  static constexpr int kTTiles = kTTiles_;  // 8-token tiles per block, shared by every warp
  static constexpr int kWarpsN = kWarpsN_;
  static constexpr int kWarpsK = kWarpsK_;
  static constexpr int kStages = kStages_;  // K groups of operands held per warp
  static constexpr int kThreads = 32 * kWarpsN * kWarpsK;
  static constexpr int kBlockN = 16 * kMTiles * kWarpsN;
  static constexpr int kBlockT = 8 * kTTiles;
  // Row pitch of the shared tile: 4 extra floats keep the MMA-layout writes free of bank
  // conflicts and rows 16-byte aligned for the vector reads.
  static constexpr int kPitch = kBlockN + 4;
};

// 16-byte load that bypasses L1: each weight byte is used once per block.
__device__ __forceinline__ uint4 LoadStreaming(const uint8_t* p) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(p));
  return v;
}

__device__ __forceinline__ uint32_t Permute(uint32_t lo, uint32_t hi, uint32_t selector) {
  uint32_t out;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(out) : "r"(lo), "r"(hi), "r"(selector));
  return out;
}

// Eight signed int4 (nibble i = element i) -> the e4m3 bytes of elements 0..3 (lo) and 4..7
// (hi). Byte permutes look the magnitudes up in two 8-entry tables (non-negative values and
// negative values); a third permute in sign-replicate mode builds the 0xFF mask of negative
// nibbles, using w << 4 to bring each even nibble's sign bit to a byte's top bit.
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

__device__ __forceinline__ void MmaE4m3(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// A lane's 16 bytes of weight row (tile_row + g + 8 * half) for K group 0; group j is at
// + j * WeightGroupStride. Lane (g, t) reads bytes [16t, 16t + 16) of the row's 64-byte group.
__device__ __forceinline__ const uint8_t* WeightLaneBase(const GroupedGemmArgs& args, int64_t expert,
                                                         int64_t tile_row, int half, int lane) {
  const int64_t expert_base = expert * args.n * (args.k / 2);
  if (args.tiled_weights) {
    return args.packed + expert_base + (tile_row / 16) * (args.k / kGemmGroupSize) * 1024 + half * 512 + lane * 16;
  }
  return args.packed + expert_base + (tile_row + lane / 4 + 8 * half) * (args.k / 2) + (lane % 4) * 16;
}

__device__ __forceinline__ int64_t WeightGroupStride(const GroupedGemmArgs& args) {
  return args.tiled_weights ? 1024 : kGemmGroupSize / 2;
}

__device__ __forceinline__ uint32_t Word(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// One K group's operands for one lane. Within a group the K order is permuted identically for
// weights and activations (the sum does not care): lane (g, t) holds K elements
// [32t, 32t + 32) of weight rows g and g + 8 and of token g, so every load is 16 contiguous bytes.
template <class Cfg>
struct GroupFragments {
  uint4 weights[Cfg::kMTiles][2];      // rows g, g + 8 of each 16-row tile: 32 int4 each
  uint4 activations[Cfg::kTTiles][2];  // token g of each 8-token tile: 32 fp8
  float scales[Cfg::kMTiles][2];
};

template <class Cfg>
struct WarpOperands {
  const uint8_t* weight_rows[Cfg::kMTiles][2];
  const float* scale_rows[Cfg::kMTiles][2];
  const uint8_t* token_rows[Cfg::kTTiles];
  bool tile_valid[Cfg::kMTiles];
  bool token_valid[Cfg::kTTiles];
  int64_t weight_group_stride;

  // This lane's operands for the 16 * kMTiles weight rows from row0 of `expert` and the
  // 8 * kTTiles tokens from token_begin (token_count of them real); rows past N and missing
  // tokens point at valid memory and are marked invalid.
  __device__ __forceinline__ void Point(const GroupedGemmArgs& args, int expert, int64_t row0,
                                        int64_t token_begin, int token_count, int lane) {
    const int g = lane / 4, t = lane % 4;
    const int groups = static_cast<int>(args.k / kGemmGroupSize);
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
            token_valid[tt] ? __ldg(reinterpret_cast<const uint4*>(token_rows[tt] + group * kGemmGroupSize) + half)
                            : make_uint4(0, 0, 0, 0);
      }
    }
  }
};

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

__device__ __forceinline__ uint4 PackBf16x8(const float (&v)[8]) {
  uint4 packed;
  __nv_bfloat162* pairs = reinterpret_cast<__nv_bfloat162*>(&packed);
#pragma unroll
  for (int i = 0; i < 4; ++i) pairs[i] = __floats2bfloat162_rn(v[2 * i], v[2 * i + 1]);
  return packed;
}

// Token tiles of kBlockT rows, numbered across experts; every block builds this table in
// shared memory from the offsets (clamped into [0, rows], so bad offsets stay in bounds).
template <int kThreads, int kBlockT>
struct TileTable {
  int row_start[kGemmMaxExperts + 1];   // clamped offsets
  int tile_start[kGemmMaxExperts + 1];  // first token tile of each expert; [E] = total tiles
  typename cub::BlockScan<int, kThreads>::TempStorage scan;

  struct Tile {
    int expert;
    int64_t token_begin;
    int token_count;
  };

  __device__ void Build(const GroupedGemmArgs& args) {
    constexpr int kScanItems = (kGemmMaxExperts + 1 + kThreads - 1) / kThreads;
    const int num_experts = static_cast<int>(args.experts);
    for (int e = threadIdx.x; e <= num_experts; e += kThreads) {
      const int64_t offset = args.offsets[e];
      row_start[e] = static_cast<int>(offset < 0 ? 0 : offset > args.rows ? args.rows : offset);
    }
    __syncthreads();
    int tiles[kScanItems];
#pragma unroll
    for (int i = 0; i < kScanItems; ++i) {
      const int e = threadIdx.x * kScanItems + i;
      tiles[i] = e < num_experts ? (max(row_start[e + 1] - row_start[e], 0) + kBlockT - 1) / kBlockT : 0;
    }
    cub::BlockScan<int, kThreads>(scan).ExclusiveSum(tiles, tiles);
#pragma unroll
    for (int i = 0; i < kScanItems; ++i) {
      const int e = threadIdx.x * kScanItems + i;
      if (e <= num_experts) tile_start[e] = tiles[i];
    }
    __syncthreads();
  }

  __device__ Tile Find(int tile, int num_experts) const {
    int lo = 0, hi = num_experts - 1;  // last expert whose first tile is <= tile
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (tile_start[mid] <= tile) lo = mid; else hi = mid - 1;
    }
    const int64_t begin = row_start[lo] + static_cast<int64_t>(tile - tile_start[lo]) * kBlockT;
    return {lo, begin, static_cast<int>(min(static_cast<int64_t>(kBlockT), row_start[lo + 1] - begin))};
  }
};

// Rows no expert owns are zero.
__device__ void ZeroUnownedRows(const GroupedGemmArgs& args, int64_t kept) {
  const int64_t zero_vectors = (args.rows - kept) * (args.n / 8);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < zero_vectors;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    *reinterpret_cast<uint4*>(args.out + kept * args.n + i * 8) = make_uint4(0, 0, 0, 0);
  }
}

template <class Cfg>
__global__ void __launch_bounds__(Cfg::kThreads) GroupedGemmKernel(GroupedGemmArgs args) {
  __shared__ TileTable<Cfg::kThreads, Cfg::kBlockT> table;
  __shared__ __align__(16) float tile_sums[Cfg::kWarpsK][Cfg::kBlockT][Cfg::kPitch];

  const int num_experts = static_cast<int>(args.experts);
  const int64_t n = args.n, k = args.k;
  const int groups = static_cast<int>(k / kGemmGroupSize);
  table.Build(args);

  const float lhs_scale = *args.lhs_scale;
  const int total_tiles = table.tile_start[num_experts];
  const int n_blocks = static_cast<int>((n + Cfg::kBlockN - 1) / Cfg::kBlockN);
  const int64_t units = static_cast<int64_t>(total_tiles) * n_blocks;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int warp_n = warp % Cfg::kWarpsN, warp_k = warp / Cfg::kWarpsN;
  const int g = lane / 4, t = lane % 4;

  // Consecutive units are token tiles of the same weight block, so blocks running together
  // share weights through L2 when an expert has several token tiles.
  for (int64_t unit = blockIdx.x; unit < units; unit += gridDim.x) {
    const int n_block = static_cast<int>(unit / total_tiles);
    const int tile = static_cast<int>(unit % total_tiles);
    const auto found = table.Find(tile, num_experts);
    const int e = found.expert;
    const int64_t token_begin = found.token_begin;
    const int token_count = found.token_count;
    const int64_t row0 = static_cast<int64_t>(n_block) * Cfg::kBlockN + warp_n * 16 * Cfg::kMTiles;

    WarpOperands<Cfg> ops;
    ops.Point(args, e, row0, token_begin, token_count, lane);

    // Register ring of kStages groups: kStages - 1 groups of loads stay in flight while one is
    // multiplied (Little's law: each SM needs tens of KB of weight loads outstanding).
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

    // MMA accumulator layout: lane (g, t) holds rows g, g + 8 and tokens 2t, 2t + 1.
#pragma unroll
    for (int mt = 0; mt < Cfg::kMTiles; ++mt) {
#pragma unroll
      for (int tt = 0; tt < Cfg::kTTiles; ++tt) {
        const int row = warp_n * 16 * Cfg::kMTiles + mt * 16 + g;
        const int token = tt * 8 + 2 * t;
        tile_sums[warp_k][token][row] = acc[mt][tt][0];
        tile_sums[warp_k][token + 1][row] = acc[mt][tt][1];
        tile_sums[warp_k][token][row + 8] = acc[mt][tt][2];
        tile_sums[warp_k][token + 1][row + 8] = acc[mt][tt][3];
      }
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < Cfg::kBlockT * Cfg::kBlockN / 8; idx += Cfg::kThreads) {
      const int token = idx / (Cfg::kBlockN / 8);
      const int col = (idx % (Cfg::kBlockN / 8)) * 8;
      const int64_t out_col = static_cast<int64_t>(n_block) * Cfg::kBlockN + col;
      if (token >= token_count || out_col >= n) continue;
      float v[8] = {};
#pragma unroll
      for (int wk = 0; wk < Cfg::kWarpsK; ++wk) {
        const float4 x0 = *reinterpret_cast<const float4*>(&tile_sums[wk][token][col]);
        const float4 x1 = *reinterpret_cast<const float4*>(&tile_sums[wk][token][col + 4]);
        v[0] += x0.x; v[1] += x0.y; v[2] += x0.z; v[3] += x0.w;
        v[4] += x1.x; v[5] += x1.y; v[6] += x1.z; v[7] += x1.w;
      }
#pragma unroll
      for (int i = 0; i < 8; ++i) v[i] *= lhs_scale;
      *reinterpret_cast<uint4*>(args.out + (token_begin + token) * n + out_col) = PackBf16x8(v);
    }
    __syncthreads();  // the next unit reuses tile_sums
  }

  ZeroUnownedRows(args, table.row_start[num_experts]);
}

// ---------------------------------------------------------------------------------------------
// Streaming kernel for decode: every warp owns whole units (one 8*kTTiles token tile times
// 16*kMTiles weight rows, all of K) and walks its units as one continuous stream of K groups.
// cp.async keeps kStages - 1 groups of operands in flight per warp in a lane-private shared
// memory ring, across unit boundaries, so no warp ever waits for a block barrier or for a
// pipeline to refill.

template <int kMTiles_, int kTTiles_, int kStages_>
struct StreamConfig {
  static constexpr int kMTiles = kMTiles_;
  static constexpr int kTTiles = kTTiles_;
  static constexpr int kStages = kStages_;
  static constexpr int kWarps = 4;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kBlockT = 8 * kTTiles;
  static constexpr int kRows = 16 * kMTiles;
  // One stage of one warp: 16-byte chunks, each laid out lane-contiguously (conflict-free).
  static constexpr int kWeightChunks = 2 * kMTiles;
  static constexpr int kActChunks = 2 * kTTiles;
  static constexpr int kStageBytes = 32 * (16 * (kWeightChunks + kActChunks) + 8 * kMTiles);
  static constexpr int kEpilogueBytes = kBlockT * kRows * 4;
  static constexpr int kSmemBytes = kWarps * (kStages * kStageBytes + kEpilogueBytes);
};

__device__ __forceinline__ void CopyAsync16(void* dst, const void* src, bool valid) {
  const uint32_t d = static_cast<uint32_t>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(d), "l"(src), "r"(valid ? 16 : 0) : "memory");
}

__device__ __forceinline__ void CopyAsync4(void* dst, const void* src, bool valid) {
  const uint32_t d = static_cast<uint32_t>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" ::"r"(d), "l"(src), "r"(valid ? 4 : 0) : "memory");
}

__device__ __forceinline__ void CommitAsync() { asm volatile("cp.async.commit_group;" ::: "memory"); }

template <int kPending>
__device__ __forceinline__ void WaitAsync() {
  asm volatile("cp.async.wait_group %0;" ::"n"(kPending) : "memory");
}

// Where one unit's operands live, for one lane.
template <class Cfg>
struct StreamUnit : WarpOperands<Cfg> {
  int64_t token_begin;
  int token_count;
  int64_t row0;

  template <class Table>
  __device__ __forceinline__ void Locate(const GroupedGemmArgs& args, const Table& table, int64_t unit,
                                         int total_tiles, int lane) {
    const auto found = table.Find(static_cast<int>(unit % total_tiles), static_cast<int>(args.experts));
    token_begin = found.token_begin;
    token_count = found.token_count;
    row0 = (unit / total_tiles) * Cfg::kRows;
    this->Point(args, found.expert, row0, token_begin, token_count, lane);
  }

  // Invalid operands are zero-filled by cp.async (source size 0), never read.
  __device__ __forceinline__ void Issue(uint8_t* stage, int group, int lane) const {
#pragma unroll
    for (int mt = 0; mt < Cfg::kMTiles; ++mt) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        CopyAsync16(stage + (2 * mt + half) * 512 + lane * 16,
                    this->weight_rows[mt][half] + group * this->weight_group_stride, this->tile_valid[mt]);
        CopyAsync4(stage + 512 * (Cfg::kWeightChunks + Cfg::kActChunks) + lane * 8 * Cfg::kMTiles + (2 * mt + half) * 4,
                   this->scale_rows[mt][half] + group, this->tile_valid[mt]);
      }
    }
#pragma unroll
    for (int tt = 0; tt < Cfg::kTTiles; ++tt) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        CopyAsync16(stage + (Cfg::kWeightChunks + 2 * tt + half) * 512 + lane * 16,
                    this->token_rows[tt] + group * kGemmGroupSize + half * 16, this->token_valid[tt]);
      }
    }
  }
};

template <class Cfg>
__device__ __forceinline__ void ReadStage(const uint8_t* stage, int lane, GroupFragments<Cfg>& f) {
#pragma unroll
  for (int mt = 0; mt < Cfg::kMTiles; ++mt) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      f.weights[mt][half] = *reinterpret_cast<const uint4*>(stage + (2 * mt + half) * 512 + lane * 16);
      f.scales[mt][half] = *reinterpret_cast<const float*>(
          stage + 512 * (Cfg::kWeightChunks + Cfg::kActChunks) + lane * 8 * Cfg::kMTiles + (2 * mt + half) * 4);
    }
  }
#pragma unroll
  for (int tt = 0; tt < Cfg::kTTiles; ++tt) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      f.activations[tt][half] =
          *reinterpret_cast<const uint4*>(stage + (Cfg::kWeightChunks + 2 * tt + half) * 512 + lane * 16);
    }
  }
}

template <class Cfg>
__global__ void __launch_bounds__(Cfg::kThreads) GroupedGemmStreamKernel(GroupedGemmArgs args) {
  __shared__ TileTable<Cfg::kThreads, Cfg::kBlockT> table;
  extern __shared__ __align__(16) uint8_t stream_smem[];
  table.Build(args);

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  uint8_t* ring = stream_smem + warp * (Cfg::kStages * Cfg::kStageBytes + Cfg::kEpilogueBytes);
  float* epilogue = reinterpret_cast<float*>(ring + Cfg::kStages * Cfg::kStageBytes);

  const int groups = static_cast<int>(args.k / kGemmGroupSize);
  const int total_tiles = table.tile_start[args.experts];
  const int64_t row_blocks = (args.n + Cfg::kRows - 1) / Cfg::kRows;
  const int64_t units = static_cast<int64_t>(total_tiles) * row_blocks;
  const int64_t first_unit = static_cast<int64_t>(blockIdx.x) * Cfg::kWarps + warp;
  const int64_t unit_stride = static_cast<int64_t>(gridDim.x) * Cfg::kWarps;
  const int64_t my_units = first_unit < units ? (units - first_unit + unit_stride - 1) / unit_stride : 0;
  const int64_t steps = my_units * groups;
  const float lhs_scale = *args.lhs_scale;

  // Load side runs kStages - 1 steps ahead of the compute side; each side tracks its own unit.
  StreamUnit<Cfg> loading, computing;
  int64_t load_step = 0;
  int load_group = 0;
  if (steps > 0) loading.Locate(args, table, first_unit, total_tiles, lane);
#pragma unroll
  for (int s = 0; s < Cfg::kStages - 1; ++s) {
    if (load_step < steps) {
      loading.Issue(ring + s * Cfg::kStageBytes, load_group, lane);
      ++load_step;
      if (++load_group == groups && load_step < steps) {
        load_group = 0;
        loading.Locate(args, table, first_unit + (load_step / groups) * unit_stride, total_tiles, lane);
      }
    }
    CommitAsync();  // empty groups keep the wait count uniform
  }

  float acc[Cfg::kMTiles][Cfg::kTTiles][4] = {};
  int compute_group = 0;
  if (steps > 0) computing.Locate(args, table, first_unit, total_tiles, lane);
  for (int64_t step = 0; step < steps; ++step) {
    WaitAsync<Cfg::kStages - 2>();
    GroupFragments<Cfg> f;
    ReadStage<Cfg>(ring + (step % Cfg::kStages) * Cfg::kStageBytes, lane, f);
    AccumulateGroup<Cfg>(f, acc);

    // Refill the slot read one step ago (this lane's own reads of it have completed).
    if (load_step < steps) {
      loading.Issue(ring + (load_step % Cfg::kStages) * Cfg::kStageBytes, load_group, lane);
      ++load_step;
      if (++load_group == groups && load_step < steps) {
        load_group = 0;
        loading.Locate(args, table, first_unit + (load_step / groups) * unit_stride, total_tiles, lane);
      }
    }
    CommitAsync();

    if (++compute_group < groups) continue;
    // Unit done: transpose through this warp's epilogue buffer into 16-byte bf16 row stores.
    compute_group = 0;
#pragma unroll
    for (int mt = 0; mt < Cfg::kMTiles; ++mt) {
#pragma unroll
      for (int tt = 0; tt < Cfg::kTTiles; ++tt) {
        const int row = mt * 16 + g, token = tt * 8 + 2 * t;
        epilogue[token * Cfg::kRows + row] = acc[mt][tt][0];
        epilogue[(token + 1) * Cfg::kRows + row] = acc[mt][tt][1];
        epilogue[token * Cfg::kRows + row + 8] = acc[mt][tt][2];
        epilogue[(token + 1) * Cfg::kRows + row + 8] = acc[mt][tt][3];
        acc[mt][tt][0] = acc[mt][tt][1] = acc[mt][tt][2] = acc[mt][tt][3] = 0.f;
      }
    }
    __syncwarp();
    for (int idx = lane; idx < Cfg::kBlockT * Cfg::kRows / 8; idx += 32) {
      const int token = idx / (Cfg::kRows / 8), col = (idx % (Cfg::kRows / 8)) * 8;
      if (token >= computing.token_count || computing.row0 + col >= args.n) continue;
      float v[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) v[i] = epilogue[token * Cfg::kRows + col + i] * lhs_scale;
      *reinterpret_cast<uint4*>(args.out + (computing.token_begin + token) * args.n + computing.row0 + col) =
          PackBf16x8(v);
    }
    __syncwarp();
    if (step + 1 < steps) {
      computing.Locate(args, table, first_unit + ((step + 1) / groups) * unit_stride, total_tiles, lane);
    }
  }
  WaitAsync<0>();
  ZeroUnownedRows(args, table.row_start[args.experts]);
}

// ---------------------------------------------------------------------------------------------
// Block-tiled work (the wgmma kernel below): a block computes one unit (kBlockRows weight rows x
// kBlockT tokens of one expert) at a time, staging each K group of both operands through a
// cp.async ring.

// Where a block's unit lies: units are numbered weight-row block fastest, so the blocks that
// run together share one token tile (and an expert's weights) through L2.
struct BlockUnit {
  int expert;
  int64_t token_begin;
  int token_count;
  int64_t row0;

  template <class Table>
  __device__ __forceinline__ void Locate(const Table& table, int64_t unit, int64_t row_blocks, int block_rows,
                                         int num_experts) {
    const auto found = table.Find(static_cast<int>(unit / row_blocks), num_experts);
    expert = found.expert;
    token_begin = found.token_begin;
    token_count = found.token_count;
    row0 = (unit % row_blocks) * block_rows;
  }
};

// The load side of a block's cp.async ring: it walks the block's (unit, K group) steps, kept
// kStages - 1 steps ahead of the compute side by the caller. Each thread copies fixed 16-byte
// chunks of every stage; their sources are found once per unit, so a step only adds the
// group's offset.
template <class Cfg>
struct BlockLoader {
  static constexpr int kWeightChunks = Cfg::kBlockRows * 4 / Cfg::kThreads;  // 64 per 16-row tile
  static constexpr int kActChunks = Cfg::kBlockT * 8 / Cfg::kThreads;        // 8 per token
  static_assert(Cfg::kBlockRows * 4 % Cfg::kThreads == 0 && Cfg::kBlockT * 8 % Cfg::kThreads == 0, "");
  const uint8_t* weight_src[kWeightChunks];
  const uint8_t* act_src[kActChunks];
  const float* scale_src;
  bool weight_valid[kWeightChunks];
  bool act_valid[kActChunks];
  bool scale_valid;
  int64_t step = 0;
  int group = 0;

  template <class Table>
  __device__ __forceinline__ void Locate(const GroupedGemmArgs& args, const Table& table, int64_t unit_index,
                                         int64_t row_blocks) {
    BlockUnit unit;
    unit.Locate(table, unit_index, row_blocks, Cfg::kBlockRows, static_cast<int>(args.experts));
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
    scale_valid = threadIdx.x < Cfg::kBlockRows && row < args.n;
    scale_src = args.scales + (unit.expert * args.n + (scale_valid ? row : 0)) * (args.k / kGemmGroupSize);
  }

  template <class Table>
  __device__ __forceinline__ void IssueNext(const GroupedGemmArgs& args, const Table& table, uint8_t* ring,
                                            int64_t steps, int groups, int64_t row_blocks) {
    if (step < steps) {
      if (group == 0) Locate(args, table, blockIdx.x + (step / groups) * gridDim.x, row_blocks);
      uint8_t* stage = ring + (step % Cfg::kStages) * Cfg::kStageBytes;
      const int64_t weight_offset = group * WeightGroupStride(args);
#pragma unroll
      for (int i = 0; i < kWeightChunks; ++i) {
        CopyAsync16(stage + (threadIdx.x + i * Cfg::kThreads) * 16, weight_src[i] + weight_offset, weight_valid[i]);
      }
#pragma unroll
      for (int i = 0; i < kActChunks; ++i) {  // 16-byte chunks XOR-swizzled by token % 8
        const int c = threadIdx.x + i * Cfg::kThreads, token = c / 8, chunk = c % 8;
        CopyAsync16(stage + Cfg::kWeightBytes + token * kGemmGroupSize + ((chunk ^ (token % 8)) * 16),
                    act_src[i] + group * kGemmGroupSize, act_valid[i]);
      }
      if (threadIdx.x < Cfg::kBlockRows) {
        CopyAsync4(stage + Cfg::kWeightBytes + Cfg::kActBytes + threadIdx.x * 4, scale_src + group, scale_valid);
      }
      ++step;
      if (++group == groups) group = 0;
    }
    CommitAsync();  // empty groups keep the wait count uniform
  }
};

// ---------------------------------------------------------------------------------------------
// Warpgroup kernel for prefill. On sm_90 the fp8 mma.sync above is emulated (ptxas unpacks e4m3
// to f16 and issues two HMMA.16816 per MMA; see docs/performance.md), so the fp8 tensor-core
// rate is only reachable through wgmma. Each K group's int4 weights are converted once per
// block into an fp8 tile in shared memory, and two warpgroups multiply 64 weight rows each by
// the 128 tokens of the unit (wgmma m64n128k32, both operands K-major from shared memory in
// the 128-byte swizzle that the activation staging already uses). The conversion of the next
// group overlaps the asynchronous MMAs of the current one.
// Hopper's fp8 wgmma adds the products of one instruction with limited alignment precision
// (about 14 bits relative to the largest term), so this kernel is not the exact f32 math of
// the reference: it runs only when the caller asks for fast accumulation.

struct WgmmaConfig {
  static constexpr int kStages = 4;
  static constexpr int kWarps = 8;  // two warpgroups
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kBlockRows = 128;
  static constexpr int kBlockT = 128;  // the wgmma N
  static constexpr int kWeightBytes = kBlockRows * kGemmGroupSize / 2;
  static constexpr int kActBytes = kBlockT * kGemmGroupSize;
  // wgmma operand tiles must start on 1024 bytes (the 8-row swizzle atom).
  static constexpr int kStageBytes = (kWeightBytes + kActBytes + kBlockRows * 4 + 1023) / 1024 * 1024;
  static constexpr int kFp8WeightBytes = kBlockRows * kGemmGroupSize;
  static constexpr int kWarpRows = 16;
  static constexpr int kStagingPitch = kWarpRows + 8;  // bf16 elements per token row
  static constexpr int kStagingBytes = kBlockT * kStagingPitch * 2;
  static constexpr int kSmemBytes = 1024 + kStages * kStageBytes + 2 * kFp8WeightBytes + kWarps * kStagingBytes;
};

// Shared-memory matrix descriptor: K-major rows of 128 bytes, 128-byte swizzle, 8-row atoms
// 1024 bytes apart.
__device__ __forceinline__ uint64_t SwizzledTileDescriptor(const void* tile) {
  const uint32_t address = static_cast<uint32_t>(__cvta_generic_to_shared(tile));
  return static_cast<uint64_t>((address & 0x3FFFF) >> 4) | (static_cast<uint64_t>(1024 >> 4) << 32) | (1ull << 62);
}

// d (+)= A[64 x 32] * B[32 x 128]; accumulate = 0 overwrites d.
__device__ __forceinline__ void WgmmaE4m3(float (&d)[64], uint64_t a, uint64_t b, int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
        "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
        "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "l"(a), "l"(b), "r"(accumulate));
}

__device__ __forceinline__ void WgmmaFence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void WgmmaCommit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int kPending>
__device__ __forceinline__ void WgmmaWait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(kPending) : "memory");
}
// Shared-memory writes of this thread become visible to the async proxy (wgmma operand reads).
__device__ __forceinline__ void FenceProxyAsync() { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }

// int4 lane chunks of one stage (lane (g, t) of a 16-row tile: K [32t, 32t + 32) of one row)
// -> the fp8 weight tile, row-major 128 bytes per row, 16-byte chunks swizzled by row % 8.
template <class Cfg>
__device__ __forceinline__ void ConvertStageWeights(const uint8_t* stage, uint8_t* fp8_weights) {
#pragma unroll
  for (int i = 0; i < Cfg::kBlockRows * 4 / Cfg::kThreads; ++i) {
    const int c = threadIdx.x + i * Cfg::kThreads, tile = c / 64, half = (c / 32) % 2, lane = c % 32;
    const int row = tile * 16 + lane / 4 + 8 * half, t = lane % 4;
    const uint4 w = *reinterpret_cast<const uint4*>(stage + c * 16);
    uint4 lo, hi;
    Int4ToE4m3(w.x, lo.x, lo.y);
    Int4ToE4m3(w.y, lo.z, lo.w);
    Int4ToE4m3(w.z, hi.x, hi.y);
    Int4ToE4m3(w.w, hi.z, hi.w);
    uint8_t* dst = fp8_weights + row * kGemmGroupSize;
    *reinterpret_cast<uint4*>(dst + (((2 * t) ^ (row % 8)) * 16)) = lo;
    *reinterpret_cast<uint4*>(dst + (((2 * t + 1) ^ (row % 8)) * 16)) = hi;
  }
  FenceProxyAsync();
}

template <class Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, 1) GroupedGemmWgmmaKernel(GroupedGemmArgs args) {
  __shared__ TileTable<Cfg::kThreads, Cfg::kBlockT> table;
  extern __shared__ uint8_t wgmma_smem_unaligned[];
  uint8_t* ring = reinterpret_cast<uint8_t*>(
      (reinterpret_cast<uintptr_t>(wgmma_smem_unaligned) + 1023) / 1024 * 1024);
  uint8_t* fp8_weights = ring + Cfg::kStages * Cfg::kStageBytes;  // two buffers
  table.Build(args);

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const int warpgroup = warp / 4;
  const int warp_row0 = warp * Cfg::kWarpRows;  // rows 16w .. 16w + 15 of the block tile
  __nv_bfloat16* staging = reinterpret_cast<__nv_bfloat16*>(fp8_weights + 2 * Cfg::kFp8WeightBytes +
                                                            warp * Cfg::kStagingBytes);

  const int num_experts = static_cast<int>(args.experts);
  const int groups = static_cast<int>(args.k / kGemmGroupSize);
  const int64_t row_blocks = (args.n + Cfg::kBlockRows - 1) / Cfg::kBlockRows;
  const int64_t units = static_cast<int64_t>(table.tile_start[num_experts]) * row_blocks;
  const int64_t my_units = blockIdx.x < units ? (units - blockIdx.x + gridDim.x - 1) / gridDim.x : 0;
  const int64_t steps = my_units * groups;
  const float lhs_scale = *args.lhs_scale;

  BlockLoader<Cfg> loader;
  BlockUnit computing;
#pragma unroll 1
  for (int s = 0; s < Cfg::kStages - 1; ++s) loader.IssueNext(args, table, ring, steps, groups, row_blocks);
  if (steps > 0) {
    WaitAsync<Cfg::kStages - 2>();
    ConvertStageWeights<Cfg>(ring, fp8_weights);
    __syncthreads();
  }

  float acc[16][4] = {};  // [8-token tile][MMA accumulator layout]: rows g, g + 8; tokens 2t, 2t + 1
  float group_sum[64];    // one K group in the wgmma accumulator layout
  int compute_group = 0;
  for (int64_t step = 0; step < steps; ++step) {
    if (compute_group == 0) {
      computing.Locate(table, blockIdx.x + (step / groups) * gridDim.x, row_blocks, Cfg::kBlockRows, num_experts);
    }
    const uint8_t* stage = ring + (step % Cfg::kStages) * Cfg::kStageBytes;
    const uint64_t a = SwizzledTileDescriptor(fp8_weights + (step % 2) * Cfg::kFp8WeightBytes +
                                              warpgroup * 64 * kGemmGroupSize);
    const uint64_t b = SwizzledTileDescriptor(stage + Cfg::kWeightBytes);  // + 2 per k32: 32 bytes on
    const float* scales = reinterpret_cast<const float*>(stage + Cfg::kWeightBytes + Cfg::kActBytes);
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
      ConvertStageWeights<Cfg>(ring + ((step + 1) % Cfg::kStages) * Cfg::kStageBytes,
                               fp8_weights + ((step + 1) % 2) * Cfg::kFp8WeightBytes);
    }

    WgmmaWait<0>();
#pragma unroll
    for (int i = 0; i < 64; ++i) asm volatile("" : "+f"(group_sum[i])::"memory");  // reads stay after the wait
#pragma unroll
    for (int tt = 0; tt < 16; ++tt) {
      acc[tt][0] += scale_lo * group_sum[4 * tt];
      acc[tt][1] += scale_lo * group_sum[4 * tt + 1];
      acc[tt][2] += scale_hi * group_sum[4 * tt + 2];
      acc[tt][3] += scale_hi * group_sum[4 * tt + 3];
    }
    __syncthreads();  // every warpgroup is done with this fp8 tile and the converted next one is complete

    if (++compute_group < groups) continue;
    compute_group = 0;
#pragma unroll
    for (int tt = 0; tt < 16; ++tt) {
      const int token = tt * 8 + 2 * t;
      staging[token * Cfg::kStagingPitch + g] = __float2bfloat16_rn(acc[tt][0] * lhs_scale);
      staging[(token + 1) * Cfg::kStagingPitch + g] = __float2bfloat16_rn(acc[tt][1] * lhs_scale);
      staging[token * Cfg::kStagingPitch + g + 8] = __float2bfloat16_rn(acc[tt][2] * lhs_scale);
      staging[(token + 1) * Cfg::kStagingPitch + g + 8] = __float2bfloat16_rn(acc[tt][3] * lhs_scale);
      acc[tt][0] = acc[tt][1] = acc[tt][2] = acc[tt][3] = 0.f;
    }
    __syncwarp();
    for (int idx = lane; idx < Cfg::kBlockT * 2; idx += 32) {
      const int token = idx / 2, col = (idx % 2) * 8;
      const int64_t out_row = computing.row0 + warp_row0 + col;
      if (token >= computing.token_count || out_row >= args.n) continue;
      *reinterpret_cast<uint4*>(args.out + (computing.token_begin + token) * args.n + out_row) =
          *reinterpret_cast<const uint4*>(staging + token * Cfg::kStagingPitch + col);
    }
    __syncwarp();
  }
  WaitAsync<0>();
  ZeroUnownedRows(args, table.row_start[num_experts]);
}

struct KernelConfig {
  void (*kernel)(GroupedGemmArgs);
  int threads;
  int smem_bytes;  // dynamic shared memory
};

template <class Cfg>
constexpr KernelConfig Entry() {
  return {GroupedGemmKernel<Cfg>, Cfg::kThreads, 0};
}

template <class Cfg>
constexpr KernelConfig StreamEntry() {
  return {GroupedGemmStreamKernel<Cfg>, Cfg::kThreads, Cfg::kSmemBytes};
}

constexpr KernelConfig WgmmaEntry() {
  return {GroupedGemmWgmmaKernel<WgmmaConfig>, WgmmaConfig::kThreads, WgmmaConfig::kSmemBytes};
}

// TileConfig<16-row tiles per warp, 8-token tiles per block, warps along N, warps along K,
// register stages>.
constexpr KernelConfig kConfigs[] = {
    Entry<TileConfig<1, 1, 2, 4, 4>>(),  // 0: decode, long K: 32 rows x 8 tokens, 4-way split K
    Entry<TileConfig<1, 1, 1, 4, 4>>(),  // 1: decode, long K: 16 rows x 8 tokens, 4-way split K
    Entry<TileConfig<1, 1, 4, 2, 4>>(),  // 2: decode, short K: 64 rows x 8 tokens
    Entry<TileConfig<1, 1, 4, 1, 4>>(),  // 3: decode, short K: 64 rows x 8 tokens, no split
    Entry<TileConfig<1, 2, 4, 2, 3>>(),  // 4: 64 rows x 16 tokens
    Entry<TileConfig<2, 2, 2, 4, 2>>(),  // 5: 64 rows x 16 tokens, 4-way split K
    Entry<TileConfig<2, 4, 4, 1, 2>>(),  // 6: 128 rows x 32 tokens
    Entry<TileConfig<1, 4, 8, 1, 2>>(),  // 7: 128 rows x 32 tokens, one tile per warp
    // StreamConfig<16-row tiles per warp, 8-token tiles per warp, cp.async stages>.
    StreamEntry<StreamConfig<1, 1, 8>>(),  // 8: decode: 16 rows x 8 tokens per warp unit
    StreamEntry<StreamConfig<1, 1, 12>>(),  // 9
    StreamEntry<StreamConfig<2, 1, 6>>(),  // 10: 32 rows x 8 tokens
    StreamEntry<StreamConfig<1, 2, 6>>(),  // 11: 16 rows x 16 tokens
    StreamEntry<StreamConfig<2, 2, 4>>(),  // 12: 32 rows x 16 tokens
    Entry<TileConfig<1, 1, 1, 8, 3>>(),    // 13: decode, long K: 16 rows x 8 tokens, 8-way split K
    Entry<TileConfig<1, 1, 1, 4, 6>>(),    // 14: as 1 with 6 register stages
    WgmmaEntry(),                          // 15: wgmma, 128 rows x 128 tokens, fast accumulation
};
constexpr int kNumConfigs = sizeof(kConfigs) / sizeof(kConfigs[0]);
constexpr int kWgmmaConfig = 15;

}  // namespace

int GroupedGemmNumConfigs() { return kNumConfigs; }

bool GroupedGemmConfigIsExact(int config) { return config != kWgmmaConfig; }

// Picked from kernel-time sweeps on an H100 (docs/performance.md) by the mean rows per expert,
// a static quantity: the routing itself is never read on the host.
int GroupedGemmDefaultConfig(int64_t rows, int64_t n, int64_t k, int64_t experts, bool fast_accumulation) {
  const double rows_per_expert = static_cast<double>(rows) / static_cast<double>(experts);
  // faster from B = 2048 tokens; gemm.py's CUDA_FAST_ACCUMULATION_ROWS_PER_EXPERT mirrors the 64
  if (fast_accumulation && rows_per_expert >= 64) return kWgmmaConfig;
  const bool long_k = k >= 2048;
  if (rows_per_expert < (long_k ? 0.1 : 1.0)) return long_k ? 1 : 3;  // a handful of experts: split K
  if (rows_per_expert <= 8) return 10;                                  // streaming, 32 rows x 8 tokens
  if (rows_per_expert <= 32) return 12;
  return 6;
}

cudaError_t LaunchGroupedGemm(const GroupedGemmArgs& args, int config, bool fast_accumulation, cudaStream_t stream) {
  if (args.rows == 0 || args.n == 0) return cudaSuccess;
  if (args.k <= 0 || args.k % kGemmGroupSize || args.n % kGemmRowAlignment || args.experts < 1 ||
      args.experts > kGemmMaxExperts || config >= kNumConfigs) {
    return cudaErrorInvalidValue;
  }
  if (config < 0) config = GroupedGemmDefaultConfig(args.rows, args.n, args.k, args.experts, fast_accumulation);
  const KernelConfig& cfg = kConfigs[config];
  int device = 0, sms = 0, blocks_per_sm = 0;
  cudaError_t status = cudaGetDevice(&device);
  if (status == cudaSuccess) status = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (status == cudaSuccess && cfg.smem_bytes > 48 * 1024) {
    status = cudaFuncSetAttribute(cfg.kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, cfg.smem_bytes);
  }
  if (status == cudaSuccess) {
    status = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks_per_sm, cfg.kernel, cfg.threads, cfg.smem_bytes);
  }
  if (status != cudaSuccess) return status;
  if (blocks_per_sm == 0) return cudaErrorInvalidConfiguration;
  cfg.kernel<<<sms * blocks_per_sm, cfg.threads, cfg.smem_bytes, stream>>>(args);
  return cudaGetLastError();
}

}  // namespace w4afp8
