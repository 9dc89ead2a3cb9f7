// FFI handler for w4afp8_combine: checks shapes, then LaunchCombine.
#include "combine.h"
#include "ffi_common.h"
#include "handlers.h"

namespace w4afp8 {
namespace {

ffi::Error Combine(cudaStream_t stream, Bf16Matrix rows, S32Matrix positions, F32Matrix topk_weights,
                   Bf16MatrixOut out, float routed_scaling_factor) {
  constexpr const char* kFn = "combine";
  const int64_t num_tokens = positions.dimensions()[0], top_k = positions.dimensions()[1];
  const int64_t num_rows = rows.dimensions()[0], hidden = rows.dimensions()[1];
  W4AFP8_RETURN_IF_ERROR(CheckShape(kFn, "topk_weights", topk_weights.dimensions(), {num_tokens, top_k}));
  W4AFP8_RETURN_IF_ERROR(CheckShape(kFn, "out", out->dimensions(), {num_tokens, hidden}));
  return LaunchStatus(
      LaunchCombine(reinterpret_cast<const __nv_bfloat16*>(rows.untyped_data()), positions.typed_data(),
                    topk_weights.typed_data(), reinterpret_cast<__nv_bfloat16*>(out->untyped_data()), num_tokens,
                    top_k, hidden, num_rows, routed_scaling_factor, stream),
      kFn);
}

}  // namespace
}  // namespace w4afp8

XLA_FFI_DEFINE_HANDLER_SYMBOL(w4afp8_combine, w4afp8::Combine,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<w4afp8::Stream>()
                                  .Arg<w4afp8::Bf16Matrix>()  // rows [R, H], GEMM2's output in expert order
                                  .Arg<w4afp8::S32Matrix>()   // positions [M, k]: outside [0, R) = dropped
                                  .Arg<w4afp8::F32Matrix>()   // topk_weights [M, k]
                                  .Ret<w4afp8::Bf16Matrix>()  // out [M, H]
                                  .Attr<float>("routed_scaling_factor"),
                              {w4afp8::kGraphSafe});
