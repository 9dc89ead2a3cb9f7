// Device helpers shared by the kernels that write fp8 activation rows (gather_quantize,
// silu_mul_quantize): bf16 unpacking, the fp8 quantization rule and their common launch shape.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace w4afp8 {

constexpr int kQuantCols = 16;  // columns per thread: 16 fp8 bytes out, 32 bf16 bytes in

// Eight bf16 values packed in one 16-byte vector, widened to f32.
__device__ __forceinline__ void Bf16x8ToFloat(const uint4& packed, float* out) {
  const __nv_bfloat162* pairs = reinterpret_cast<const __nv_bfloat162*>(&packed);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __bfloat1622float2(pairs[i]);
    out[2 * i] = f.x;
    out[2 * i + 1] = f.y;
  }
}

// q = saturate(v / scale) to [-448, 448], rounded to nearest even e4m3. The IEEE division (not a
// multiply by the reciprocal) is what the reference path computes.
__device__ __forceinline__ uint8_t QuantizeFp8(float v, float scale) {
  return __nv_cvt_float_to_fp8(__fdiv_rn(v, scale), __NV_SATFINITE, __NV_E4M3);
}

// The same rule for 16 values, packed in order into 16 bytes.
__device__ __forceinline__ uint4 QuantizeFp8x16(const float* v, float scale) {
  uint4 packed;
  uint16_t* pairs = reinterpret_cast<uint16_t*>(&packed);
#pragma unroll
  for (int i = 0; i < kQuantCols / 2; ++i) {
    const float2 f = make_float2(__fdiv_rn(v[2 * i], scale), __fdiv_rn(v[2 * i + 1], scale));
    pairs[i] = __nv_cvt_float2_to_fp8x2(f, __NV_SATFINITE, __NV_E4M3);  // f.x in the low byte
  }
  return packed;
}

// Launch shape for "one thread per kQuantCols columns of a row": blockDim.x threads cover a
// column range of one row, blockDim.y rows share a block when rows are short. Thread (x, y) of
// block (bx, by) handles row bx * blockDim.y + y and column chunk by * blockDim.x + x.
struct RowChunkLaunch {
  dim3 grid, block;
};

inline RowChunkLaunch MakeRowChunkLaunch(int64_t rows, int64_t chunks_per_row) {
  constexpr int64_t kMaxThreads = 256;
  const int64_t blocks_per_row = (chunks_per_row + kMaxThreads - 1) / kMaxThreads;
  const int64_t threads_x = (chunks_per_row + blocks_per_row - 1) / blocks_per_row;  // even split
  const int64_t threads_y = kMaxThreads / threads_x;
  RowChunkLaunch launch;
  launch.block = dim3(static_cast<unsigned>(threads_x), static_cast<unsigned>(threads_y));
  launch.grid = dim3(static_cast<unsigned>((rows + threads_y - 1) / threads_y), static_cast<unsigned>(blocks_per_row));
  return launch;
}

}  // namespace w4afp8
