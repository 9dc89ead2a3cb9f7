// FFI handler for w4afp8_route: translates XLA buffers into LaunchRoute's arguments.
#include "ffi_common.h"
#include "handlers.h"
#include "route.h"

namespace w4afp8 {
namespace {

ffi::Error Route(cudaStream_t stream, S32Matrix topk_ids, S32VectorOut rows_per_expert, S32VectorOut group_offsets,
                 S32MatrixOut positions, S32VectorOut workspace, int32_t num_experts) {
  if (num_experts < 1 || num_experts > 1024) return InvalidArgument("route: num_experts must be in [1, 1024]");
  const auto dims = topk_ids.dimensions();
  const int64_t num_slots = dims[0] * dims[1];
  if (num_slots > INT32_MAX) return InvalidArgument("route: M * k must fit in int32");
  if (rows_per_expert->element_count() != static_cast<size_t>(num_experts) ||
      group_offsets->element_count() != static_cast<size_t>(num_experts) + 1) {
    return InvalidArgument("route: rows_per_expert must be [E] and group_offsets [E + 1]");
  }
  if (positions->dimensions()[0] != dims[0] || positions->dimensions()[1] != dims[1]) {
    return InvalidArgument("route: positions must have the shape of topk_ids");
  }
  if (workspace->element_count() < static_cast<size_t>(RouteWorkspaceElements(num_slots, num_experts))) {
    return InvalidArgument("route: workspace too small");
  }
  return LaunchStatus(LaunchRoute(topk_ids.typed_data(), rows_per_expert->typed_data(), group_offsets->typed_data(),
                                  positions->typed_data(), workspace->typed_data(), num_slots, num_experts, stream),
                      "route");
}

}  // namespace
}  // namespace w4afp8

XLA_FFI_DEFINE_HANDLER_SYMBOL(W4afp8Route, w4afp8::Route,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<w4afp8::Stream>()
                                  .Arg<w4afp8::S32Matrix>()
                                  .Ret<w4afp8::S32Vector>()
                                  .Ret<w4afp8::S32Vector>()
                                  .Ret<w4afp8::S32Matrix>()
                                  .Ret<w4afp8::S32Vector>()
                                  .Attr<int32_t>("num_experts"),
                              {w4afp8::kGraphSafe});
