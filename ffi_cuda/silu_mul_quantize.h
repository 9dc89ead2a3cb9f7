// Step 4: SiLU(gate) * up on GEMM1's output, requantized to fp8 e4m3 for GEMM2.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace w4afp8 {

// c1: bf16 [num_rows, 2 * inter] (gate columns, then up columns); group_offsets: int32
// [num_experts + 1] on the device, of which only group_offsets[num_experts] (the kept rows,
// clamped to [0, num_rows]) is read, on the device; scale: f32 [1] on the device; out: fp8 e4m3
// bytes [num_rows, inter]. Kept rows get saturate(silu(g) * u / scale) in f32 with
// silu(g) = g / (1 + expf(-g)); the other rows are zero. The grid depends on the sizes only.
cudaError_t LaunchSiluMulQuantize(const __nv_bfloat16* c1, const int32_t* group_offsets, const float* scale,
                                  uint8_t* out, int64_t num_rows, int64_t inter, int64_t num_experts,
                                  cudaStream_t stream);

}  // namespace w4afp8
