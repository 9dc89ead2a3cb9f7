// FFI handler for w4afp8_silu_mul_quantize: translates XLA buffers into LaunchSiluMulQuantize's arguments.
#include "ffi_common.h"
#include "handlers.h"
#include "silu_mul_quantize.h"

namespace w4afp8 {
namespace {

ffi::Error SiluMulQuantize(cudaStream_t stream, Bf16Matrix c1, S32Vector group_offsets, F32Vector scale,
                           AnyOut out) {
  const int64_t num_rows = c1.dimensions()[0], width = c1.dimensions()[1];
  if (width % 2) return InvalidArgument("silu_mul_quantize: c1 must have 2 * I columns");
  const int64_t inter = width / 2;
  if (group_offsets.element_count() < 1) return InvalidArgument("silu_mul_quantize: group_offsets is empty");
  const int64_t num_experts = static_cast<int64_t>(group_offsets.element_count()) - 1;
  if (scale.element_count() != 1) return InvalidArgument("silu_mul_quantize: scale must have one element");
  W4AFP8_RETURN_IF_ERROR(RequireType(*out, ffi::DataType::F8E4M3FN, "silu_mul_quantize: out"));
  W4AFP8_RETURN_IF_ERROR(RequireRank(*out, 2, "silu_mul_quantize: out"));
  if (out->dimensions()[0] != num_rows || out->dimensions()[1] != inter) {
    return InvalidArgument("silu_mul_quantize: out must be [R, I]");
  }
  return LaunchStatus(
      LaunchSiluMulQuantize(reinterpret_cast<const __nv_bfloat16*>(c1.untyped_data()), group_offsets.typed_data(),
                            scale.typed_data(), static_cast<uint8_t*>(out->untyped_data()), num_rows, inter,
                            num_experts, stream),
      "silu_mul_quantize");
}

}  // namespace
}  // namespace w4afp8

XLA_FFI_DEFINE_HANDLER_SYMBOL(W4afp8SiluMulQuantize, w4afp8::SiluMulQuantize,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<w4afp8::Stream>()
                                  .Arg<w4afp8::Bf16Matrix>()
                                  .Arg<w4afp8::S32Vector>()
                                  .Arg<w4afp8::F32Vector>()
                                  .Ret<xla::ffi::AnyBuffer>(),
                              {w4afp8::kGraphSafe});
