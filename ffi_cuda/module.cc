// The nanobind module: one table of FFI targets, registered from Python by _backend.py.
#include <nanobind/nanobind.h>

#include "grouped_gemm.h"
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
    targets["w4afp8_route"] = Capsule(W4afp8Route);
    targets["w4afp8_gather_quantize"] = Capsule(W4afp8GatherQuantize);
    targets["w4afp8_silu_mul_quantize"] = Capsule(W4afp8SiluMulQuantize);
    targets["w4afp8_grouped_gemm"] = Capsule(W4afp8GroupedGemm);
    return targets;
  });
  m.def("grouped_gemm_num_configs", &w4afp8::GroupedGemmNumConfigs,
        "Number of tile configurations the grouped GEMM can be asked for (benchmark sweeps).");
  m.def("grouped_gemm_config_is_exact", &w4afp8::GroupedGemmConfigIsExact,
        "Whether a tile configuration computes the exact f32 group sums (the wgmma one does not).");
}
