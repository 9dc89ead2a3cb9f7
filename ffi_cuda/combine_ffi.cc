// FFI handler for w4afp8_combine: translates XLA buffers into LaunchCombine's arguments.
#include "combine.h"
#include "ffi_common.h"
#include "handlers.h"

namespace w4afp8 {
namespace {

ffi::Error Combine(cudaStream_t stream, Bf16Matrix rows, S32Matrix positions, F32Matrix weights,
                   Bf16MatrixOut out, float scaling) {
  const auto pos_dims = positions.dimensions();
  const int64_t num_tokens = pos_dims[0], top_k = pos_dims[1];
  const int64_t num_rows = rows.dimensions()[0], hidden = rows.dimensions()[1];
  if (weights.dimensions()[0] != num_tokens || weights.dimensions()[1] != top_k) {
    return InvalidArgument("combine: weights must match positions");
  }
  if (out->dimensions()[0] != num_tokens || out->dimensions()[1] != hidden) {
    return InvalidArgument("combine: out must be [num_tokens, hidden]");
  }
  return LaunchStatus(
      LaunchCombine(reinterpret_cast<const __nv_bfloat16*>(rows.untyped_data()), positions.typed_data(),
                    weights.typed_data(), reinterpret_cast<__nv_bfloat16*>(out->untyped_data()), num_tokens,
                    top_k, hidden, num_rows, scaling, stream),
      "combine");
}

}  // namespace
}  // namespace w4afp8

XLA_FFI_DEFINE_HANDLER_SYMBOL(W4afp8Combine, w4afp8::Combine,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<w4afp8::Stream>()
                                  .Arg<w4afp8::Bf16Matrix>()
                                  .Arg<w4afp8::S32Matrix>()
                                  .Arg<w4afp8::F32Matrix>()
                                  .Ret<w4afp8::Bf16Matrix>()
                                  .Attr<float>("routed_scaling_factor"),
                              {w4afp8::kGraphSafe});
