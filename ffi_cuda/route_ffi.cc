// FFI handler for w4afp8_route: checks shapes, then LaunchRoute.
#include "ffi_common.h"
#include "handlers.h"
#include "kernel_limits.h"
#include "route.h"

namespace w4afp8 {
namespace {

ffi::Error Route(cudaStream_t stream, S32Matrix topk_ids, S32VectorOut rows_per_expert, S32VectorOut group_offsets,
                 S32MatrixOut positions, S32VectorOut workspace, int32_t num_experts) {
  constexpr const char* kFn = "route";
  if (num_experts < 1 || num_experts > kMaxExperts) {
    return InvalidArgument("w4afp8_jax.route: num_experts must be in [1, " + std::to_string(kMaxExperts) + "], got " +
                           std::to_string(num_experts));
  }
  const int64_t num_tokens = topk_ids.dimensions()[0], top_k = topk_ids.dimensions()[1];
  const int64_t num_slots = num_tokens * top_k;
  if (num_slots > INT32_MAX) return InvalidArgument("w4afp8_jax.route: M * k must fit in int32");
  W4AFP8_RETURN_IF_ERROR(CheckShape(kFn, "rows_per_expert", rows_per_expert->dimensions(), {num_experts}));
  W4AFP8_RETURN_IF_ERROR(CheckShape(kFn, "group_offsets", group_offsets->dimensions(), {num_experts + 1}));
  W4AFP8_RETURN_IF_ERROR(CheckShape(kFn, "positions", positions->dimensions(), {num_tokens, top_k}));
  W4AFP8_RETURN_IF_ERROR(
      CheckShape(kFn, "workspace", workspace->dimensions(), {RouteWorkspaceElements(num_slots, num_experts)}));
  return LaunchStatus(LaunchRoute(topk_ids.typed_data(), rows_per_expert->typed_data(), group_offsets->typed_data(),
                                  positions->typed_data(), workspace->typed_data(), num_slots, num_experts, stream),
                      kFn);
}

}  // namespace
}  // namespace w4afp8

XLA_FFI_DEFINE_HANDLER_SYMBOL(w4afp8_route, w4afp8::Route,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<w4afp8::Stream>()
                                  .Arg<w4afp8::S32Matrix>()     // topk_ids [M, k]: ids outside [0, E) are dropped
                                  .Ret<w4afp8::S32Vector>()     // rows_per_expert [E]
                                  .Ret<w4afp8::S32Vector>()     // group_offsets [E + 1], exclusive prefix sums
                                  .Ret<w4afp8::S32Matrix>()     // positions [M, k]: expert-sorted row, -1 dropped
                                  .Ret<w4afp8::S32Vector>()     // workspace [RouteWorkspaceElements(M * k, E)]
                                  .Attr<int32_t>("num_experts"),  // E
                              {w4afp8::kGraphSafe});
