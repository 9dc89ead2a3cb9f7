// FFI handler for w4afp8_gather_quantize: translates XLA buffers into LaunchGatherQuantize's arguments.
#include "ffi_common.h"
#include "gather_quantize.h"
#include "handlers.h"

namespace w4afp8 {
namespace {

ffi::Error GatherQuantize(cudaStream_t stream, Bf16Matrix x, S32Matrix positions, F32Vector scale, AnyOut out) {
  const int64_t num_tokens = x.dimensions()[0], hidden = x.dimensions()[1];
  const int64_t top_k = positions.dimensions()[1];
  if (positions.dimensions()[0] != num_tokens) return InvalidArgument("gather_quantize: positions must be [M, k]");
  if (scale.element_count() != 1) return InvalidArgument("gather_quantize: scale must have one element");
  W4AFP8_RETURN_IF_ERROR(RequireType(*out, ffi::DataType::F8E4M3FN, "gather_quantize: out"));
  W4AFP8_RETURN_IF_ERROR(RequireRank(*out, 2, "gather_quantize: out"));
  if (out->dimensions()[0] != num_tokens * top_k || out->dimensions()[1] != hidden) {
    return InvalidArgument("gather_quantize: out must be [M * k, H]");
  }
  return LaunchStatus(
      LaunchGatherQuantize(reinterpret_cast<const __nv_bfloat16*>(x.untyped_data()), positions.typed_data(),
                           scale.typed_data(), static_cast<uint8_t*>(out->untyped_data()), num_tokens, top_k,
                           hidden, stream),
      "gather_quantize");
}

}  // namespace
}  // namespace w4afp8

XLA_FFI_DEFINE_HANDLER_SYMBOL(W4afp8GatherQuantize, w4afp8::GatherQuantize,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<w4afp8::Stream>()
                                  .Arg<w4afp8::Bf16Matrix>()
                                  .Arg<w4afp8::S32Matrix>()
                                  .Arg<w4afp8::F32Vector>()
                                  .Ret<xla::ffi::AnyBuffer>(),
                              {w4afp8::kGraphSafe});
