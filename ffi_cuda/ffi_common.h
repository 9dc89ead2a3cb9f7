// Shared aliases and error helpers for the FFI handlers. Kernels never include this file:
// they take raw pointers and sizes (see the per-op headers).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "xla/ffi/api/ffi.h"

namespace w4afp8 {

namespace ffi = xla::ffi;

using Stream = ffi::PlatformStream<cudaStream_t>;
constexpr auto kGraphSafe = ffi::Traits::kCmdBufferCompatible;

// Typed buffer aliases (also keep template commas out of the handler-definition macros).
using Bf16Matrix = ffi::Buffer<ffi::BF16, 2>;
using F32Matrix = ffi::Buffer<ffi::F32, 2>;
using F32Vector = ffi::Buffer<ffi::F32, 1>;
using S32Matrix = ffi::Buffer<ffi::S32, 2>;
using S32Vector = ffi::Buffer<ffi::S32, 1>;
using U8Tensor3 = ffi::Buffer<ffi::U8, 3>;
using F32Tensor3 = ffi::Buffer<ffi::F32, 3>;
using Bf16MatrixOut = ffi::ResultBuffer<ffi::BF16, 2>;
using S32MatrixOut = ffi::ResultBuffer<ffi::S32, 2>;
using S32VectorOut = ffi::ResultBuffer<ffi::S32, 1>;
using AnyOut = ffi::Result<ffi::AnyBuffer>;

inline ffi::Error InvalidArgument(const std::string& what) {
  return ffi::Error(ffi::ErrorCode::kInvalidArgument, what);
}

inline ffi::Error RequireType(const ffi::AnyBuffer& buffer, ffi::DataType type, const char* name) {
  if (buffer.element_type() != type) return InvalidArgument(std::string(name) + ": unexpected element type");
  return ffi::Error::Success();
}

inline ffi::Error RequireRank(const ffi::AnyBuffer& buffer, size_t rank, const char* name) {
  if (buffer.dimensions().size() != rank) return InvalidArgument(std::string(name) + ": unexpected rank");
  return ffi::Error::Success();
}

// Launch errors are reported through the FFI instead of being lost.
inline ffi::Error LaunchStatus(cudaError_t status, const char* kernel) {
  if (status == cudaSuccess) status = cudaGetLastError();
  if (status != cudaSuccess) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string(kernel) + ": " + cudaGetErrorString(status));
  }
  return ffi::Error::Success();
}

}  // namespace w4afp8

// Returns early from a handler when a check fails.
#define W4AFP8_RETURN_IF_ERROR(expr)      \
  do {                                    \
    ::xla::ffi::Error _err = (expr);      \
    if (_err.failure()) return _err;      \
  } while (0)
