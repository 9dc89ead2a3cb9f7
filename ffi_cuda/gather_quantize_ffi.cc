// FFI handler for w4afp8_gather_quantize: checks shapes, then LaunchGatherQuantize.
#include "ffi_common.h"
#include "gather_quantize.h"
#include "handlers.h"

namespace w4afp8 {
namespace {

ffi::Error GatherQuantize(cudaStream_t stream, Bf16Matrix x, S32Matrix positions, F32Vector scale, AnyOut out) {
  constexpr const char* kFn = "gather_quantize";
  const int64_t num_tokens = x.dimensions()[0], hidden = x.dimensions()[1];
  const int64_t top_k = positions.dimensions()[1];
  W4AFP8_RETURN_IF_ERROR(CheckShape(kFn, "positions", positions.dimensions(), {num_tokens, -1}));
  W4AFP8_RETURN_IF_ERROR(CheckShape(kFn, "scale", scale.dimensions(), {1}));
  W4AFP8_RETURN_IF_ERROR(CheckFp8(kFn, "out", *out));
  W4AFP8_RETURN_IF_ERROR(CheckShape(kFn, "out", out->dimensions(), {num_tokens * top_k, hidden}));
  return LaunchStatus(
      LaunchGatherQuantize(reinterpret_cast<const __nv_bfloat16*>(x.untyped_data()), positions.typed_data(),
                           scale.typed_data(), static_cast<uint8_t*>(out->untyped_data()), num_tokens, top_k,
                           hidden, stream),
      kFn);
}

}  // namespace
}  // namespace w4afp8

XLA_FFI_DEFINE_HANDLER_SYMBOL(w4afp8_gather_quantize, w4afp8::GatherQuantize,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<w4afp8::Stream>()
                                  .Arg<w4afp8::Bf16Matrix>()         // x [M, H]
                                  .Arg<w4afp8::S32Matrix>()          // positions [M, k] from route
                                  .Arg<w4afp8::F32Vector>()          // scale [1]
                                  .Ret<xla::ffi::AnyBuffer>(),       // out fp8 [M * k, H], expert order
                              {w4afp8::kGraphSafe});
