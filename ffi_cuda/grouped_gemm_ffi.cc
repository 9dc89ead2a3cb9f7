// FFI handler for w4afp8_grouped_gemm: checks shapes, resolves the configuration, then
// LaunchGroupedGemm.
#include "ffi_common.h"
#include "grouped_gemm.h"
#include "handlers.h"
#include "kernel_limits.h"

namespace w4afp8 {
namespace {

ffi::Error GroupedGemm(cudaStream_t stream, ffi::AnyBuffer lhs, F32Vector lhs_scale, U8Tensor3 packed,
                       F32Tensor3 scales, S32Vector layer, S32Vector group_offsets, Bf16MatrixOut out,
                       std::string_view config, bool tiled_layout, bool exact) {
  constexpr const char* kFn = "grouped_gemm";
  W4AFP8_RETURN_IF_ERROR(CheckFp8(kFn, "lhs", lhs));
  W4AFP8_RETURN_IF_ERROR(CheckShape(kFn, "lhs", lhs.dimensions(), {-1, -1}));
  const int64_t rows = lhs.dimensions()[0], k = lhs.dimensions()[1];
  const int64_t experts = group_offsets.dimensions()[0] - 1, n = packed.dimensions()[1];
  const int64_t layers = experts > 0 ? packed.dimensions()[0] / experts : 0;
  W4AFP8_RETURN_IF_ERROR(CheckShape(kFn, "rhs.packed", packed.dimensions(), {layers * experts, n, k / 2}));
  if (k % kGroupSize || n % kRowAlignment || experts < 1 || experts > kMaxExperts) {
    return InvalidArgument("w4afp8_jax.grouped_gemm: needs K % " + std::to_string(kGroupSize) + " == 0, N % " +
                           std::to_string(kRowAlignment) + " == 0 and 1 <= E <= " + std::to_string(kMaxExperts) +
                           ", got K = " + std::to_string(k) + ", N = " + std::to_string(n) +
                           ", E = " + std::to_string(experts));
  }
  W4AFP8_RETURN_IF_ERROR(CheckShape(kFn, "rhs.scales", scales.dimensions(), {layers * experts, n, k / kGroupSize}));
  W4AFP8_RETURN_IF_ERROR(CheckShape(kFn, "rhs.index", layer.dimensions(), {1}));
  W4AFP8_RETURN_IF_ERROR(CheckShape(kFn, "lhs_scale", lhs_scale.dimensions(), {1}));
  W4AFP8_RETURN_IF_ERROR(CheckShape(kFn, "out", out->dimensions(), {rows, n}));
  const int index = config.empty() ? GroupedGemmDefaultConfig(rows, n, k, experts, exact)
                                   : FindGroupedGemmConfig(config);
  if (index < 0) {
    return InvalidArgument("w4afp8_jax.grouped_gemm: unknown config '" + std::string(config) + "'");
  }
  if (exact && !GroupedGemmConfigs()[index].exact) {
    return InvalidArgument("w4afp8_jax.grouped_gemm: config '" + std::string(config) +
                           "' is not exact but precision asks for the exact group sums");
  }
  const GroupedGemmArgs args{static_cast<const uint8_t*>(lhs.untyped_data()),
                             lhs_scale.typed_data(),
                             packed.typed_data(),
                             scales.typed_data(),
                             layer.typed_data(),
                             layers,
                             group_offsets.typed_data(),
                             reinterpret_cast<__nv_bfloat16*>(out->untyped_data()),
                             rows,
                             n,
                             k,
                             experts,
                             tiled_layout};
  return LaunchStatus(LaunchGroupedGemm(args, index, stream), kFn);
}

}  // namespace
}  // namespace w4afp8

XLA_FFI_DEFINE_HANDLER_SYMBOL(w4afp8_grouped_gemm, w4afp8::GroupedGemm,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<w4afp8::Stream>()
                                  .Arg<xla::ffi::AnyBuffer>()      // lhs fp8 [R, K], rows in expert order
                                  .Arg<w4afp8::F32Vector>()        // lhs_scale [1]
                                  .Arg<w4afp8::U8Tensor3>()        // rhs.packed [L * E, N, K/2], int4 pairs
                                  .Arg<w4afp8::F32Tensor3>()       // rhs.scales [L * E, N, K/128]
                                  .Arg<w4afp8::S32Vector>()        // rhs.index [1]: the layer of L (L = 1: 0)
                                  .Arg<w4afp8::S32Vector>()        // group_offsets [E + 1]
                                  .Ret<w4afp8::Bf16Matrix>()       // out [R, N]
                                  .Attr<std::string_view>("config")  // a configuration name; "" = heuristic
                                  .Attr<bool>("tiled_layout")      // rhs.packed in the tiled byte order
                                  .Attr<bool>("exact"),            // precision asks for exact group sums
                              {w4afp8::kGraphSafe});
