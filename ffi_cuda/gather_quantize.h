// Step 2: gather token rows into expert order and quantize them to fp8 e4m3.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace w4afp8 {

// x: bf16 [num_tokens, hidden]; positions: int32 [num_tokens, top_k]; scale: f32 [1] on the
// device; out: fp8 e4m3 bytes [num_tokens * top_k, hidden]. Row positions[t, j] of out becomes
// saturate(x[t] / scale); a position outside [0, num_tokens * top_k) is skipped, and rows no
// position names are zero.
cudaError_t LaunchGatherQuantize(const __nv_bfloat16* x, const int32_t* positions, const float* scale,
                                 uint8_t* out, int64_t num_tokens, int64_t top_k, int64_t hidden,
                                 cudaStream_t stream);

}  // namespace w4afp8
