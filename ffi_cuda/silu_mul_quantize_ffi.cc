// FFI handler for w4afp8_silu_mul_quantize: checks shapes, then LaunchSiluMulQuantize.
#include "ffi_common.h"
#include "handlers.h"
#include "silu_mul_quantize.h"

namespace w4afp8 {
namespace {

ffi::Error SiluMulQuantize(cudaStream_t stream, Bf16Matrix c1, S32Vector group_offsets, F32Vector scale,
                           AnyOut out) {
  constexpr const char* kFn = "silu_mul_quantize";
  const int64_t num_rows = c1.dimensions()[0], width = c1.dimensions()[1];
  if (width % 2) return InvalidArgument("w4afp8_jax.silu_mul_quantize: c1 must have 2 * I columns");
  const int64_t num_experts = group_offsets.dimensions()[0] - 1;
  if (num_experts < 0) return InvalidArgument("w4afp8_jax.silu_mul_quantize: group_offsets must be [E + 1]");
  W4AFP8_RETURN_IF_ERROR(CheckShape(kFn, "scale", scale.dimensions(), {1}));
  W4AFP8_RETURN_IF_ERROR(CheckFp8(kFn, "out", *out));
  W4AFP8_RETURN_IF_ERROR(CheckShape(kFn, "out", out->dimensions(), {num_rows, width / 2}));
  return LaunchStatus(
      LaunchSiluMulQuantize(reinterpret_cast<const __nv_bfloat16*>(c1.untyped_data()), group_offsets.typed_data(),
                            scale.typed_data(), static_cast<uint8_t*>(out->untyped_data()), num_rows, width / 2,
                            num_experts, stream),
      kFn);
}

}  // namespace
}  // namespace w4afp8

XLA_FFI_DEFINE_HANDLER_SYMBOL(w4afp8_silu_mul_quantize, w4afp8::SiluMulQuantize,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<w4afp8::Stream>()
                                  .Arg<w4afp8::Bf16Matrix>()         // c1 [R, 2I]: gate columns, then up
                                  .Arg<w4afp8::S32Vector>()          // group_offsets [E + 1]; [E] = kept rows
                                  .Arg<w4afp8::F32Vector>()          // scale [1]
                                  .Ret<xla::ffi::AnyBuffer>(),       // out fp8 [R, I]
                              {w4afp8::kGraphSafe});
