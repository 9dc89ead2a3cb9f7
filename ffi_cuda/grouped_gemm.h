// Steps 3 and 5: grouped GEMM of fp8 e4m3 rows by int4 weights with one f32 scale per 128
// input channels, bf16 out. For expert e, rows offsets[e]..offsets[e+1] of lhs use weights e:
//   out[r, n] = lhs_scale * sum_g scales[e, n, g] * sum_{k in g} lhs[r, k] * w[e, n, k]
// Rows at or past offsets[E] are written as zeros. Offsets are read on the device only.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace w4afp8 {

constexpr int kGemmGroupSize = 128;
constexpr int kGemmRowAlignment = 16;  // n must be a multiple of this
constexpr int kGemmMaxExperts = 1024;

struct GroupedGemmArgs {
  const uint8_t* lhs;        // fp8 e4m3 [rows, k]
  const float* lhs_scale;    // [1], on the device
  // [experts, n, k / 2], element 2i in the low nibble. Checkpoint order: each row's K/2 bytes
  // contiguous. Tiled order (tiled_weights): one contiguous 1 KiB block per (16-row tile,
  // 128-wide group), laid out as the MMA lanes read it (see tile_packed in weights.py).
  const uint8_t* packed;
  const float* scales;       // [experts, n, k / 128]
  const int32_t* offsets;    // [experts + 1]; clamped to [0, rows] on the device
  __nv_bfloat16* out;        // [rows, n]
  int64_t rows;
  int64_t n;
  int64_t k;
  int64_t experts;
  bool tiled_weights;
};

// Number of kernel configurations (tile shapes); see grouped_gemm.cu for the table.
int GroupedGemmNumConfigs();

// Whether a configuration computes the exact math above (f32 sums of each K group). The wgmma
// configuration does not: Hopper's fp8 tensor cores add the products of one instruction with
// about 14 bits of alignment precision ("fast accumulation").
bool GroupedGemmConfigIsExact(int config);

// The configuration the dispatcher picks for these static sizes (the data never matters);
// fast_accumulation allows the inexact wgmma configuration.
int GroupedGemmDefaultConfig(int64_t rows, int64_t n, int64_t k, int64_t experts, bool fast_accumulation);

// config < 0 picks the default. Requires k % 128 == 0, n % 16 == 0, 1 <= experts <= 1024.
cudaError_t LaunchGroupedGemm(const GroupedGemmArgs& args, int config, bool fast_accumulation, cudaStream_t stream);

}  // namespace w4afp8
