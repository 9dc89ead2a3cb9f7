// The grouped GEMM's schedule: which rows belong to which expert, the work units (expert,
// token tile, weight-row block) every kernel family walks, and the rows no expert owns.
//
// Every block derives the table from the offsets on the device, so a launch never depends on
// the routing (CUDA-graph safe). Offsets are clamped into [0, rows] and made non-decreasing by
// a running maximum: expert e owns rows [row_start[e], row_start[e + 1]), any offsets give
// disjoint in-bounds row ranges, and rows outside [row_start[0], row_start[E]) are zero.
#pragma once

#include <cub/block/block_scan.cuh>
#include <cuda/functional>

#include "../grouped_gemm.h"
#include "../kernel_limits.h"
#include "../launch.cuh"

namespace w4afp8::gemm {

template <int kThreads, int kBlockT>
struct TileTable {
  static constexpr int kScanItems = (kMaxExperts + 1 + kThreads - 1) / kThreads;
  int row_start[kMaxExperts + 1];   // clamped, non-decreasing offsets
  int tile_start[kMaxExperts + 1];  // first token tile of each expert; [E] = total tiles
  typename cub::BlockScan<int, kThreads>::TempStorage scan;

  struct Tile {
    int expert;
    int64_t token_begin;
    int token_count;
  };

  __device__ void Build(const GroupedGemmArgs& args) {
    const int num_experts = static_cast<int>(args.experts);
    int items[kScanItems];
#pragma unroll
    for (int i = 0; i < kScanItems; ++i) {  // blocked arrangement: thread j holds entries j*kScanItems + i
      const int e = threadIdx.x * kScanItems + i;
      const int64_t offset = e <= num_experts ? args.offsets[e] : 0;
      items[i] = static_cast<int>(offset < 0 ? 0 : offset > args.rows ? args.rows : offset);
    }
    cub::BlockScan<int, kThreads>(scan).InclusiveScan(items, items, cuda::maximum<>{});
#pragma unroll
    for (int i = 0; i < kScanItems; ++i) {
      const int e = threadIdx.x * kScanItems + i;
      if (e <= num_experts) row_start[e] = items[i];
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < kScanItems; ++i) {
      const int e = threadIdx.x * kScanItems + i;
      items[i] = e < num_experts ? (row_start[e + 1] - row_start[e] + kBlockT - 1) / kBlockT : 0;
    }
    cub::BlockScan<int, kThreads>(scan).ExclusiveSum(items, items);
#pragma unroll
    for (int i = 0; i < kScanItems; ++i) {
      const int e = threadIdx.x * kScanItems + i;
      if (e <= num_experts) tile_start[e] = items[i];
    }
    __syncthreads();
  }

  __device__ int total_tiles(int num_experts) const { return tile_start[num_experts]; }

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

// Work units are (token tile, weight-row block) pairs, numbered either with token tiles
// fastest (blocks running together share an expert's weights through L2: decode and mid-size
// batches) or with row blocks fastest (they share a token tile's activations: prefill, where
// an expert's activation rows outweigh its weights).
enum class UnitOrder { kTokenTilesFastest, kRowBlocksFastest };

struct Unit {
  int expert;
  int64_t token_begin;
  int token_count;
  int64_t row0;  // first weight row
};

template <UnitOrder kOrder, class Table>
__device__ __forceinline__ Unit LocateUnit(const Table& table, int64_t unit, int num_experts, int64_t row_blocks,
                                           int rows_per_unit) {
  const int total_tiles = table.total_tiles(num_experts);
  const bool tiles_fastest = kOrder == UnitOrder::kTokenTilesFastest;
  const int tile = static_cast<int>(tiles_fastest ? unit % total_tiles : unit / row_blocks);
  const int64_t row_block = tiles_fastest ? unit / total_tiles : unit % row_blocks;
  const auto found = table.Find(tile, num_experts);
  return {found.expert, found.token_begin, found.token_count, row_block * rows_per_unit};
}

// The weight set of the selected layer (read on the device, clamped so any index stays in
// bounds).
__device__ __forceinline__ GroupedGemmArgs SelectLayer(GroupedGemmArgs args) {
  if (args.layers > 1) {
    const int64_t layer = min(max(static_cast<int64_t>(*args.layer), int64_t{0}), args.layers - 1);
    args.packed += layer * args.experts * args.n * (args.k / 2);
    args.scales += layer * args.experts * args.n * (args.k / kGroupSize);
  }
  return args;
}

// Rows no expert owns, [0, first) and [kept, rows), are zero.
__device__ inline void ZeroUnownedRows(const GroupedGemmArgs& args, int64_t first, int64_t kept) {
  const int64_t vectors_per_row = args.n / 8;
  const int64_t head = first * vectors_per_row;
  const int64_t total = head + (args.rows - kept) * vectors_per_row;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t vector = i < head ? i : kept * vectors_per_row + (i - head);
    *reinterpret_cast<uint4*>(args.out + vector * 8) = make_uint4(0, 0, 0, 0);
  }
}

}  // namespace w4afp8::gemm
