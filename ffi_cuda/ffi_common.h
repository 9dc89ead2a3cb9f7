// Shared aliases and checks for the FFI handlers. Kernels never include this file: they take
// raw pointers and sizes (see the per-op headers).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>
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
// fp8 buffers arrive untyped (the FFI API maps no C++ type to F8E4M3FN); CheckFp8 checks them.
using AnyOut = ffi::Result<ffi::AnyBuffer>;
using S32MatrixOut = ffi::ResultBuffer<ffi::S32, 2>;
using S32VectorOut = ffi::ResultBuffer<ffi::S32, 1>;

inline ffi::Error InvalidArgument(const std::string& what) {
  return ffi::Error(ffi::ErrorCode::kInvalidArgument, what);
}

inline std::string FormatShape(ffi::Span<const int64_t> dims) {
  std::string s = "[";
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
  return s + "]";
}

// One shape check for every handler: `expected` lists the dimensions, -1 for "any". The message
// names the Python function and the argument, and gives both shapes:
//   "w4afp8_jax.grouped_gemm: scales must have shape [256, 1024, 56], got [256, 1024, 28]".
inline ffi::Error CheckShape(const char* function, const char* arg, ffi::Span<const int64_t> dims,
                             std::initializer_list<int64_t> expected) {
  bool ok = dims.size() == expected.size();
  for (size_t i = 0; ok && i < dims.size(); ++i) ok = expected.begin()[i] < 0 || expected.begin()[i] == dims[i];
  if (ok) return ffi::Error::Success();
  std::string want = "[";
  for (size_t i = 0; i < expected.size(); ++i) {
    const int64_t d = expected.begin()[i];
    want += (i ? ", " : "") + (d < 0 ? std::string("*") : std::to_string(d));
  }
  return InvalidArgument(std::string("w4afp8_jax.") + function + ": " + arg + " must have shape " + want +
                         "], got " + FormatShape(dims));
}

inline ffi::Error CheckFp8(const char* function, const char* arg, const ffi::AnyBuffer& buffer) {
  if (buffer.element_type() == ffi::DataType::F8E4M3FN) return ffi::Error::Success();
  return InvalidArgument(std::string("w4afp8_jax.") + function + ": " + arg + " must be float8_e4m3fn");
}

// Launch errors are reported through the FFI instead of being lost.
inline ffi::Error LaunchStatus(cudaError_t status, const char* function) {
  if (status == cudaSuccess) status = cudaGetLastError();
  if (status != cudaSuccess) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("w4afp8_jax.") + function + ": " + cudaGetErrorString(status));
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
