#include "launch.cuh"
#include "quantize_rows.cuh"
#include "silu_mul_quantize.h"

namespace w4afp8 {
namespace {

// silu(g) * u in f32, in the reference's order: (g / (1 + exp(-g))) * u.
__device__ __forceinline__ float SiluMul(float g, float u) { return __fdiv_rn(g, 1.0f + expf(-g)) * u; }

// One thread per (row, 16 output columns) over every row; rows at or past the kept count
// (group_offsets[num_experts], read here on the device) are written as zeros, as the reference
// writes them (so no caller ever reads unwritten memory).
template <bool kVectorized>
__global__ void SiluMulQuantizeKernel(const __nv_bfloat16* __restrict__ c1, const int32_t* __restrict__ group_offsets,
                                      const float* __restrict__ scale_ptr, uint8_t* __restrict__ out,
                                      int64_t num_rows, int64_t inter, int64_t num_experts) {
  BeginKernel();
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const int64_t col = (static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x) * kQuantCols;
  if (row >= num_rows || col >= inter) return;
  const int64_t kept = min(max(static_cast<int64_t>(group_offsets[num_experts]), int64_t{0}), num_rows);
  uint8_t* dst = out + row * inter + col;
  if (row >= kept) {
    const int width = static_cast<int>(min(static_cast<int64_t>(kQuantCols), inter - col));
    if (kVectorized) {
      *reinterpret_cast<uint4*>(dst) = make_uint4(0, 0, 0, 0);
    } else {
      for (int i = 0; i < width; ++i) dst[i] = 0;
    }
    return;
  }
  const float scale = *scale_ptr;
  const __nv_bfloat16* gate = c1 + row * 2 * inter + col;
  const __nv_bfloat16* up = gate + inter;
  if constexpr (kVectorized) {
    const uint4* gate_vec = reinterpret_cast<const uint4*>(gate);
    const uint4* up_vec = reinterpret_cast<const uint4*>(up);
    const uint4 g_lo = gate_vec[0], g_hi = gate_vec[1], u_lo = up_vec[0], u_hi = up_vec[1];
    float g[kQuantCols], u[kQuantCols];
    Bf16x8ToFloat(g_lo, g);
    Bf16x8ToFloat(g_hi, g + 8);
    Bf16x8ToFloat(u_lo, u);
    Bf16x8ToFloat(u_hi, u + 8);
#pragma unroll
    for (int i = 0; i < kQuantCols; ++i) g[i] = SiluMul(g[i], u[i]);
    *reinterpret_cast<uint4*>(dst) = QuantizeFp8x16(g, scale);
  } else {
    const int width = static_cast<int>(min(static_cast<int64_t>(kQuantCols), inter - col));
    for (int i = 0; i < width; ++i) {
      dst[i] = QuantizeFp8(SiluMul(__bfloat162float(gate[i]), __bfloat162float(up[i])), scale);
    }
  }
}

}  // namespace

cudaError_t LaunchSiluMulQuantize(const __nv_bfloat16* c1, const int32_t* group_offsets, const float* scale,
                                  uint8_t* out, int64_t num_rows, int64_t inter, int64_t num_experts,
                                  cudaStream_t stream) {
  if (num_rows == 0 || inter == 0) return cudaSuccess;
  const RowChunkLaunch launch = MakeRowChunkLaunch(num_rows, (inter + kQuantCols - 1) / kQuantCols);
  // 16-byte accesses need inter % 16 == 0 (gate, up and out row starts aligned) and aligned bases.
  const bool vectorized = inter % kQuantCols == 0 && reinterpret_cast<uintptr_t>(c1) % 16 == 0 &&
                          reinterpret_cast<uintptr_t>(out) % 16 == 0;
  const auto kernel = vectorized ? SiluMulQuantizeKernel<true> : SiluMulQuantizeKernel<false>;
  return Launch(kernel, launch.grid, launch.block, 0, stream, c1, group_offsets, scale, out, num_rows, inter,
                num_experts);
}

}  // namespace w4afp8
