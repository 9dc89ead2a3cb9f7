// The nanobind module: the FFI targets of ops.def, and the kernels' sizes, limits and
// configuration table for Python (w4afp8_jax/_backend.py).
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>

#include "grouped_gemm.h"
#include "handlers.h"
#include "kernel_limits.h"
#include "route.h"

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
#define W4AFP8_OP(op) targets["w4afp8_" #op] = Capsule(w4afp8_##op);
#include "ops.def"
#undef W4AFP8_OP
    return targets;
  });
  m.def("limits", []() {
    nb::dict limits;
    limits["max_experts"] = w4afp8::kMaxExperts;
    limits["group_size"] = w4afp8::kGroupSize;
    limits["row_alignment"] = w4afp8::kRowAlignment;
    return limits;
  });
  m.def("grouped_gemm_configs", []() {
    nb::list configs;
    for (const auto& c : w4afp8::GroupedGemmConfigs()) {
      nb::dict d;
      d["name"] = c.name;
      d["family"] = c.family;
      d["exact"] = c.exact;
      d["rows"] = c.rows;
      d["tokens"] = c.tokens;
      configs.append(d);
    }
    return configs;
  }, "The grouped GEMM's kernel configurations, in table order.");
  m.def("grouped_gemm_default_config",
        [](int64_t rows, int64_t n, int64_t k, int64_t experts, bool exact) {
          return w4afp8::GroupedGemmConfigs()[w4afp8::GroupedGemmDefaultConfig(rows, n, k, experts, exact)].name;
        },
        "The configuration name the heuristic picks for these static sizes.");
  m.def("route_workspace_elements", &w4afp8::RouteWorkspaceElements,
        "int32 elements of the routing kernels' scratch output for M * k slots and E experts.");
}
