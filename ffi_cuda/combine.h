// Step 6: out[t] = scaling * sum_j weights[t, j] * rows[positions[t, j]] (f32 math, bf16 out).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace w4afp8 {

// rows: bf16 [num_rows, hidden]; positions, weights: [num_tokens, top_k]. A position outside
// [0, num_rows) (a dropped slot) contributes nothing.
cudaError_t LaunchCombine(const __nv_bfloat16* rows, const int32_t* positions, const float* weights,
                          __nv_bfloat16* out, int64_t num_tokens, int64_t top_k, int64_t hidden,
                          int64_t num_rows, float scaling, cudaStream_t stream);

}  // namespace w4afp8
