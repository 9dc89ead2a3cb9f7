// Sizes and limits the kernels impose; module.cc exports them to Python (w4afp8_jax._backend
// .limits()), so they are written only here.
#pragma once

#include <cstdint>

namespace w4afp8 {

constexpr int kMaxExperts = 1024;   // experts per layer (one block scans the offsets)
constexpr int kGroupSize = 128;     // input channels per weight scale
constexpr int kRowAlignment = 16;   // N of a weight matrix: whole 16-row MMA tiles

}  // namespace w4afp8
