// The nanobind module: one table of FFI targets, registered from Python by _backend.py.
#include <nanobind/nanobind.h>

#include "handlers.h"

namespace nb = nanobind;

namespace {

template <typename Fn>
nb::capsule Capsule(Fn* fn) {
  return nb::capsule(reinterpret_cast<void*>(fn));
}

}  // namespace

NB_MODULE(_w4afp8_cuda, m) {
  m.def("registrations", []() {
    nb::dict targets;
    targets["w4afp8_combine"] = Capsule(W4afp8Combine);
    return targets;
  });
}
