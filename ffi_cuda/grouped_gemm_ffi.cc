// FFI handler for w4afp8_grouped_gemm: shape checks, then LaunchGroupedGemm.
#include "ffi_common.h"
#include "grouped_gemm.h"
#include "handlers.h"

namespace w4afp8 {
namespace {

ffi::Error GroupedGemm(cudaStream_t stream, ffi::AnyBuffer lhs, F32Vector lhs_scale, U8Tensor3 packed,
                       F32Tensor3 scales, S32Vector offsets, Bf16MatrixOut out, int32_t config,
                       int32_t tiled_layout, int32_t fast_accumulation) {
  W4AFP8_RETURN_IF_ERROR(RequireType(lhs, ffi::DataType::F8E4M3FN, "grouped_gemm: lhs"));
  W4AFP8_RETURN_IF_ERROR(RequireRank(lhs, 2, "grouped_gemm: lhs"));
  const int64_t rows = lhs.dimensions()[0], k = lhs.dimensions()[1];
  const int64_t experts = packed.dimensions()[0], n = packed.dimensions()[1];
  if (packed.dimensions()[2] * 2 != k) return InvalidArgument("grouped_gemm: packed must be [E, N, K/2]");
  if (k % kGemmGroupSize || n % kGemmRowAlignment) {
    return InvalidArgument("grouped_gemm: K must be a multiple of 128 and N of 16");
  }
  if (experts < 1 || experts > kGemmMaxExperts) return InvalidArgument("grouped_gemm: 1 <= E <= 1024");
  if (scales.dimensions()[0] != experts || scales.dimensions()[1] != n ||
      scales.dimensions()[2] != k / kGemmGroupSize) {
    return InvalidArgument("grouped_gemm: scales must be [E, N, K/128]");
  }
  if (offsets.dimensions()[0] != experts + 1) return InvalidArgument("grouped_gemm: offsets must be [E+1]");
  if (lhs_scale.dimensions()[0] != 1) return InvalidArgument("grouped_gemm: lhs_scale must be [1]");
  if (out->dimensions()[0] != rows || out->dimensions()[1] != n) {
    return InvalidArgument("grouped_gemm: out must be [rows, N]");
  }
  if (config >= GroupedGemmNumConfigs()) return InvalidArgument("grouped_gemm: unknown config");
  const GroupedGemmArgs args{static_cast<const uint8_t*>(lhs.untyped_data()),
                             lhs_scale.typed_data(),
                             packed.typed_data(),
                             scales.typed_data(),
                             offsets.typed_data(),
                             reinterpret_cast<__nv_bfloat16*>(out->untyped_data()),
                             rows,
                             n,
                             k,
                             experts,
                             tiled_layout != 0};
  return LaunchStatus(LaunchGroupedGemm(args, config, fast_accumulation != 0, stream), "grouped_gemm");
}

}  // namespace
}  // namespace w4afp8

XLA_FFI_DEFINE_HANDLER_SYMBOL(W4afp8GroupedGemm, w4afp8::GroupedGemm,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<w4afp8::Stream>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Arg<w4afp8::F32Vector>()
                                  .Arg<w4afp8::U8Tensor3>()
                                  .Arg<w4afp8::F32Tensor3>()
                                  .Arg<w4afp8::S32Vector>()
                                  .Ret<w4afp8::Bf16Matrix>()
                                  .Attr<int32_t>("config")
                                  .Attr<int32_t>("tiled_layout")
                                  .Attr<int32_t>("fast_accumulation"),
                              {w4afp8::kGraphSafe});
