#include <cub/block/block_scan.cuh>

#include <algorithm>

#include "kernel_limits.h"
#include "launch.cuh"
#include "route.h"

namespace w4afp8 {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kExpertsPerThread = kMaxExperts / kThreads;  // blocked layout of the offsets scan
constexpr int kScanThreads = 1024;                         // one thread per expert in ScanTilesKernel
constexpr int kScanBatch = 16;                             // loads in flight per thread there
constexpr unsigned kFullMask = 0xffffffffu;

static_assert(kRouteTile % kThreads == 0, "a tile must split into whole 32-slot rounds per warp");
static_assert(kRouteSingleBlockMax % kThreads == 0, "same for the single-block tile");

// How the tile kernel is used:
//   kSingle: one block holds every slot and writes all three outputs;
//   kCount:  per-tile expert counts into the workspace, counts[tile][expert];
//   kRank:   positions, after ScanTilesKernel turned the counts into per-tile bases.
enum class Mode { kSingle, kCount, kRank };

__device__ __forceinline__ int ExpertKey(int32_t id, int num_experts) {
  return (id >= 0 && id < num_experts) ? id : num_experts;  // num_experts = dropped
}

// Copies ids[0, count) into shared memory as expert keys with 16-byte loads for the aligned
// middle and scalar loads for the head and tail (ids may start anywhere 4-byte aligned).
// s_raw holds count + 4 ints; the keys start at the returned pointer, shifted so that the
// vector part lands 16-byte aligned in shared memory too.
__device__ int* StageKeys(const int32_t* __restrict__ ids, int count, int num_experts, int* s_raw) {
  const int head = min(count, static_cast<int>((16 - reinterpret_cast<uintptr_t>(ids) % 16) % 16 / 4));
  int* s_keys = s_raw + ((4 - head) & 3);
  const int num_vec = (count - head) / 4;
  const int4* src = reinterpret_cast<const int4*>(ids + head);
  int4* dst = reinterpret_cast<int4*>(s_keys + head);
  for (int i = threadIdx.x; i < num_vec; i += kThreads) {
    const int4 v = src[i];
    dst[i] = make_int4(ExpertKey(v.x, num_experts), ExpertKey(v.y, num_experts), ExpertKey(v.z, num_experts),
                       ExpertKey(v.w, num_experts));
  }
  if (static_cast<int>(threadIdx.x) < head) s_keys[threadIdx.x] = ExpertKey(ids[threadIdx.x], num_experts);
  for (int i = head + 4 * num_vec + threadIdx.x; i < count; i += kThreads) {
    s_keys[i] = ExpertKey(ids[i], num_experts);
  }
  return s_keys;
}

// Warp w owns the contiguous slots [w * seg, (w + 1) * seg) of the tile and walks them in rounds
// of 32 consecutive slots, so (warp, round, lane) order is the flattened token-major order.
// Adds the warp's count of every expert to its own row of s_wcount ([kWarps][num_experts]).
__device__ void CountPass(const int* s_keys, int count, int seg, int num_experts, int* s_wcount) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int begin = warp * seg, end = min(count, begin + seg);
  int* row = s_wcount + warp * num_experts;
  for (int base = begin; base < end; base += 32) {  // warp-uniform trip count
    const int i = base + lane;
    const int key = i < end ? s_keys[i] : num_experts;
    const unsigned peers = __match_any_sync(kFullMask, key);
    if (key < num_experts && lane == __ffs(peers) - 1) row[key] += __popc(peers);
    __syncwarp();
  }
}

// Same walk as CountPass, with s_wcount now holding each (warp, expert)'s first output row:
// a slot's position is that base plus the same-expert slots before it in its round.
__device__ void RankPass(const int* s_keys, int count, int seg, int num_experts, int* s_wcount,
                         int32_t* __restrict__ positions) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int begin = warp * seg, end = min(count, begin + seg);
  int* row = s_wcount + warp * num_experts;
  const unsigned lanes_before = (1u << lane) - 1u;
  for (int base = begin; base < end; base += 32) {
    const int i = base + lane;
    const int key = i < end ? s_keys[i] : num_experts;
    const unsigned peers = __match_any_sync(kFullMask, key);
    const bool kept = key < num_experts;
    const int first = kept ? row[key] : 0;  // every peer reads before the leader advances it
    __syncwarp();
    if (kept && lane == __ffs(peers) - 1) row[key] = first + __popc(peers);
    __syncwarp();
    if (i < end) positions[i] = kept ? first + __popc(peers & lanes_before) : -1;
  }
}

// Replaces the warp counts of expert e by exclusive prefixes across warps, starting at first.
__device__ __forceinline__ void WarpPrefixes(int* s_wcount, int num_experts, int e, int first) {
  for (int w = 0; w < kWarps; ++w) {
    const int c = s_wcount[w * num_experts + e];
    s_wcount[w * num_experts + e] = first;
    first += c;
  }
}

// Block b handles slots [b * tile, min(n, (b + 1) * tile)). Dynamic shared memory:
// kWarps * num_experts + tile + 4 ints.
template <Mode kMode>
__global__ void __launch_bounds__(kThreads) RouteTileKernel(const int32_t* __restrict__ ids, int64_t num_slots,
                                                             int num_experts, int tile, int32_t* counts,
                                                             int32_t* __restrict__ rows_per_expert,
                                                             int32_t* group_offsets, int32_t* __restrict__ positions) {
  BeginKernel();
  extern __shared__ int4 s_mem[];
  int* s_wcount = reinterpret_cast<int*>(s_mem);
  int* s_raw = s_wcount + kWarps * num_experts;
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * tile;
  const int count = static_cast<int>(min(static_cast<int64_t>(tile), num_slots - begin));
  const int seg = tile / kWarps;

  for (int i = threadIdx.x; i < kWarps * num_experts; i += kThreads) s_wcount[i] = 0;
  const int* s_keys = StageKeys(ids + begin, count, num_experts, s_raw);
  __syncthreads();
  CountPass(s_keys, count, seg, num_experts, s_wcount);
  __syncthreads();

  if constexpr (kMode == Mode::kCount) {
    for (int e = threadIdx.x; e < num_experts; e += kThreads) {
      int total = 0;
      for (int w = 0; w < kWarps; ++w) total += s_wcount[w * num_experts + e];
      counts[static_cast<int64_t>(blockIdx.x) * num_experts + e] = total;
    }
  } else {
    if constexpr (kMode == Mode::kSingle) {
      using BlockScan = cub::BlockScan<int, kThreads>;
      __shared__ typename BlockScan::TempStorage scan_storage;
      int totals[kExpertsPerThread], firsts[kExpertsPerThread];
#pragma unroll
      for (int c = 0; c < kExpertsPerThread; ++c) {
        const int e = threadIdx.x * kExpertsPerThread + c;
        totals[c] = 0;
        if (e < num_experts) {
          for (int w = 0; w < kWarps; ++w) totals[c] += s_wcount[w * num_experts + e];
        }
      }
      int kept_total;
      BlockScan(scan_storage).ExclusiveSum(totals, firsts, kept_total);
#pragma unroll
      for (int c = 0; c < kExpertsPerThread; ++c) {
        const int e = threadIdx.x * kExpertsPerThread + c;
        if (e < num_experts) {
          rows_per_expert[e] = totals[c];
          group_offsets[e] = firsts[c];
          WarpPrefixes(s_wcount, num_experts, e, firsts[c]);
        }
      }
      if (threadIdx.x == 0) group_offsets[num_experts] = kept_total;
    } else {  // kRank: ScanTilesKernel left this tile's first row of every expert in the workspace
      for (int e = threadIdx.x; e < num_experts; e += kThreads) {
        WarpPrefixes(s_wcount, num_experts, e,
                     group_offsets[e] + counts[static_cast<int64_t>(blockIdx.x) * num_experts + e]);
      }
    }
    __syncthreads();
    RankPass(s_keys, count, seg, num_experts, s_wcount, positions + begin);
  }
}

// One block, one thread per expert: turns counts[tile][expert] into exclusive prefixes over the
// tiles, then scans the expert totals into rows_per_expert and group_offsets.
__global__ void __launch_bounds__(kScanThreads) ScanTilesKernel(int32_t* counts, int64_t num_tiles, int num_experts,
                                                                int32_t* __restrict__ rows_per_expert,
                                                                int32_t* __restrict__ group_offsets) {
  BeginKernel();
  using BlockScan = cub::BlockScan<int, kScanThreads>;
  __shared__ typename BlockScan::TempStorage scan_storage;
  const int e = threadIdx.x;
  int total = 0;
  if (e < num_experts) {
    for (int64_t b0 = 0; b0 < num_tiles; b0 += kScanBatch) {
      int v[kScanBatch];
#pragma unroll
      for (int i = 0; i < kScanBatch; ++i) v[i] = b0 + i < num_tiles ? counts[(b0 + i) * num_experts + e] : 0;
#pragma unroll
      for (int i = 0; i < kScanBatch; ++i) {
        if (b0 + i < num_tiles) counts[(b0 + i) * num_experts + e] = total;
        total += v[i];
      }
    }
  }
  int first, kept_total;
  BlockScan(scan_storage).ExclusiveSum(total, first, kept_total);
  if (e < num_experts) {
    rows_per_expert[e] = total;
    group_offsets[e] = first;
  }
  if (e == 0) group_offsets[num_experts] = kept_total;
}

template <Mode kMode>
cudaError_t LaunchTiles(int64_t num_tiles, int tile, int num_experts, cudaStream_t stream, const int32_t* ids,
                        int64_t num_slots, int32_t* counts, int32_t* rows_per_expert, int32_t* group_offsets,
                        int32_t* positions) {
  const size_t smem = sizeof(int) * (static_cast<size_t>(kWarps) * num_experts + tile + 4);
  // Past 48 KiB of static + dynamic shared memory a kernel must opt in; the static part (CUB's
  // scan storage) is small, so opting in from 40 KiB of dynamic memory leaves a safe margin.
  if (smem > 40 * 1024) {
    const cudaError_t status =
        cudaFuncSetAttribute(RouteTileKernel<kMode>, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (status != cudaSuccess) return status;
  }
  return Launch(RouteTileKernel<kMode>, static_cast<unsigned>(num_tiles), kThreads, smem, stream, ids, num_slots,
                num_experts, tile, counts, rows_per_expert, group_offsets, positions);
}

}  // namespace

int64_t RouteWorkspaceElements(int64_t num_slots, int64_t num_experts) {
  if (num_slots <= kRouteSingleBlockMax) return 1;  // unused, but XLA buffers are never empty
  return num_experts * ((num_slots + kRouteTile - 1) / kRouteTile);
}

cudaError_t LaunchRoute(const int32_t* topk_ids, int32_t* rows_per_expert, int32_t* group_offsets,
                        int32_t* positions, int32_t* workspace, int64_t num_slots, int num_experts,
                        cudaStream_t stream) {
  if (num_experts < 1 || num_experts > kMaxExperts || num_slots < 0) return cudaErrorInvalidValue;
  if (num_slots <= kRouteSingleBlockMax) {
    const int tile = static_cast<int>(std::max<int64_t>(kThreads, (num_slots + kThreads - 1) / kThreads * kThreads));
    return LaunchTiles<Mode::kSingle>(1, tile, num_experts, stream, topk_ids, num_slots, nullptr, rows_per_expert,
                                      group_offsets, positions);
  }
  const int64_t num_tiles = (num_slots + kRouteTile - 1) / kRouteTile;
  const int tile = static_cast<int>(kRouteTile);
  cudaError_t status = LaunchTiles<Mode::kCount>(num_tiles, tile, num_experts, stream, topk_ids, num_slots, workspace,
                                                 rows_per_expert, group_offsets, positions);
  if (status != cudaSuccess) return status;
  status = Launch(ScanTilesKernel, 1, kScanThreads, 0, stream, workspace, num_tiles, num_experts, rows_per_expert,
                  group_offsets);
  if (status != cudaSuccess) return status;
  return LaunchTiles<Mode::kRank>(num_tiles, tile, num_experts, stream, topk_ids, num_slots, workspace,
                                  rows_per_expert, group_offsets, positions);
}

}  // namespace w4afp8
