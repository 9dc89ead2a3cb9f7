// Step 1: rows per expert, exclusive group offsets and the stable expert-sorted position of
// every (token, slot) pair.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace w4afp8 {

// Slots per block of the multi-block path, and the largest slot count the single-block path
// takes. Python sizes the workspace with RouteWorkspaceElements (exported by module.cc).
constexpr int64_t kRouteTile = 4096;
constexpr int64_t kRouteSingleBlockMax = 4096;

// int32 elements of workspace LaunchRoute needs for num_slots = M * k slots: one (unused) on
// the single-block path, num_experts * ceil(num_slots / kRouteTile) otherwise.
int64_t RouteWorkspaceElements(int64_t num_slots, int64_t num_experts);

// topk_ids: int32 [num_slots] (token-major [M, k]); any value may arrive, ids outside
// [0, num_experts) are dropped slots. Writes rows_per_expert [num_experts], group_offsets
// [num_experts + 1] and positions [num_slots] (-1 for a dropped slot). workspace must hold
// RouteWorkspaceElements(...) int32 values; its contents on entry do not matter.
// num_experts must be in [1, kMaxExperts]. The launches depend on the sizes only.
cudaError_t LaunchRoute(const int32_t* topk_ids, int32_t* rows_per_expert, int32_t* group_offsets,
                        int32_t* positions, int32_t* workspace, int64_t num_slots, int num_experts,
                        cudaStream_t stream);

}  // namespace w4afp8
