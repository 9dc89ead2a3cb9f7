// Steps 3 and 5: grouped GEMM of fp8 e4m3 rows by int4 weights with one f32 scale per 128
// input channels, bf16 out. For expert e, rows offsets[e]..offsets[e+1] of lhs use weights e:
//   out[r, n] = lhs_scale * sum_g scales[e, n, g] * sum_{k in g} lhs[r, k] * w[e, n, k]
// Offsets are read on the device only, clamped into [0, rows] and made non-decreasing (a
// running maximum), so any offsets stay in bounds; rows outside [offsets[0], offsets[E]) are
// written as zeros.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace w4afp8 {

struct GroupedGemmArgs {
  const uint8_t* lhs;        // fp8 e4m3 [rows, k]
  const float* lhs_scale;    // [1], on the device
  // [experts, n, k / 2], element 2i in the low nibble. Checkpoint order: each row's K/2 bytes
  // contiguous. Tiled order (tiled_weights): one contiguous 1 KiB block per (16-row tile,
  // 128-wide group), laid out as the MMA lanes read it (see tile_packed in weights.py).
  const uint8_t* packed;
  const float* scales;       // [experts, n, k / 128]
  // packed and scales may hold `layers` stacked weight sets ([layers * experts, ...]); *layer
  // (on the device, clamped into [0, layers)) selects one. A layer stack scanned this way is
  // never copied: XLA would copy a sliced operand of a custom call.
  const int32_t* layer;      // [1]
  int64_t layers;
  const int32_t* offsets;    // [experts + 1]
  __nv_bfloat16* out;        // [rows, n]
  int64_t rows;
  int64_t n;
  int64_t k;
  int64_t experts;
  bool tiled_weights;
};

// One kernel configuration (a kernel family and its tile shape), by name, e.g.
// "stream_32x8_s6": the streaming family, 32 weight rows x 8 tokens per unit, 6 stages.
struct GroupedGemmConfig {
  std::string name;
  const char* family;  // "register", "stream", "wgmma" or "tma"
  bool exact;          // the exact f32 sum of every K group (wgmma's fp8 accumulation is not)
  int rows;            // weight rows per work unit
  int tokens;          // tokens per work unit
};

const std::vector<GroupedGemmConfig>& GroupedGemmConfigs();

// Index of the configuration with this name, or -1.
int FindGroupedGemmConfig(std::string_view name);

// The configuration the heuristic picks for these static sizes (the routing never matters);
// exact = false allows the inexact wgmma configuration.
int GroupedGemmDefaultConfig(int64_t rows, int64_t n, int64_t k, int64_t experts, bool exact);

// Requires k % kGroupSize == 0, n % kRowAlignment == 0, 1 <= experts <= kMaxExperts and a
// valid config index.
cudaError_t LaunchGroupedGemm(const GroupedGemmArgs& args, int config, cudaStream_t stream);

}  // namespace w4afp8
