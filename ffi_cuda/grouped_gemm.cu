// Steps 3 and 5: the grouped GEMM's configuration table, the heuristic that picks one from the
// static sizes, and the launcher. The kernel families live in grouped_gemm/ (one header per
// family, built from the shared ptx, operand, MMA, schedule and epilogue headers).
#include <array>

#include "grouped_gemm.h"
#include "grouped_gemm/register_kernel.cuh"
#include "grouped_gemm/stream_kernel.cuh"
#include "grouped_gemm/wgmma_kernel.cuh"
#include "kernel_limits.h"
#include "launch.cuh"

namespace w4afp8 {
namespace {

using gemm::RegisterConfig;
using gemm::StreamConfig;
using gemm::WgmmaConfig;

struct KernelEntry {
  void (*kernel)(GroupedGemmArgs);
  int threads;
  int smem_bytes;  // dynamic shared memory
  GroupedGemmConfig info;
};

template <class Cfg>
KernelEntry Describe(void (*kernel)(GroupedGemmArgs), int smem_bytes) {
  return {kernel, Cfg::kThreads, smem_bytes, {Cfg::Name(), Cfg::kFamily, Cfg::kExact, Cfg::kRows, Cfg::kTokens}};
}

template <class Cfg>
KernelEntry Register() {
  return Describe<Cfg>(gemm::GroupedGemmRegisterKernel<Cfg>, 0);
}

template <class Cfg>
KernelEntry Stream() {
  return Describe<Cfg>(gemm::GroupedGemmStreamKernel<Cfg>, Cfg::kSmemBytes);
}

KernelEntry Wgmma() {
  return Describe<WgmmaConfig>(gemm::GroupedGemmWgmmaKernel<WgmmaConfig>, gemm::WgmmaSmemBytes<WgmmaConfig>());
}

// RegisterConfig<16-row tiles per warp, 8-token tiles per block, warps along N, warps along K,
// register stages>; StreamConfig<16-row tiles per warp, 8-token tiles per warp, cp.async
// stages>. Names follow (family_rows x tokens _k split-K _s stages). The heuristic uses a few;
// the rest are candidates for the sweeps in benchmarks/ncu_gemm_tiles.py.
const std::vector<KernelEntry>& Table() {
  static const std::vector<KernelEntry> table = {
      Register<RegisterConfig<1, 1, 2, 4, 4>>(),  // register_32x8_k4_s4
      Register<RegisterConfig<1, 1, 1, 4, 4>>(),  // register_16x8_k4_s4: decode, long K
      Register<RegisterConfig<1, 1, 4, 2, 4>>(),  // register_64x8_k2_s4
      Register<RegisterConfig<1, 1, 4, 1, 4>>(),  // register_64x8_k1_s4: decode, short K
      Register<RegisterConfig<1, 2, 4, 2, 3>>(),  // register_64x16_k2_s3
      Register<RegisterConfig<2, 2, 2, 4, 2>>(),  // register_64x16_k4_s2
      Register<RegisterConfig<2, 4, 4, 1, 2>>(),  // register_128x32_k1_s2: mid-size batches
      Register<RegisterConfig<1, 1, 1, 8, 3>>(),  // register_16x8_k8_s3
      Register<RegisterConfig<1, 1, 1, 4, 6>>(),  // register_16x8_k4_s6
      Stream<StreamConfig<1, 1, 8>>(),            // stream_16x8_s8
      Stream<StreamConfig<1, 1, 12>>(),           // stream_16x8_s12
      Stream<StreamConfig<2, 1, 6>>(),            // stream_32x8_s6: decode
      Stream<StreamConfig<1, 2, 6>>(),            // stream_16x16_s6
      Stream<StreamConfig<2, 2, 4>>(),            // stream_32x16_s4: decode, larger batches
      Stream<StreamConfig<2, 1, 4>>(),            // stream_32x8_s4: 3 blocks per SM, for the occupancy sweep
      Stream<StreamConfig<1, 1, 4>>(),            // stream_16x8_s4: the same with 16-row units
      Wgmma(),                                    // wgmma_128x128_s4: prefill, precision=DEFAULT
  };
  return table;
}

}  // namespace

const std::vector<GroupedGemmConfig>& GroupedGemmConfigs() {
  static const std::vector<GroupedGemmConfig> configs = [] {
    std::vector<GroupedGemmConfig> out;
    for (const KernelEntry& entry : Table()) out.push_back(entry.info);
    return out;
  }();
  return configs;
}

int FindGroupedGemmConfig(std::string_view name) {
  const auto& table = Table();
  for (size_t i = 0; i < table.size(); ++i) {
    if (table[i].info.name == name) return static_cast<int>(i);
  }
  return -1;
}

// Picked from kernel-time sweeps (Nsight Compute on an H200, docs/performance.md) by the mean
// rows per expert R/E, a static quantity: the routing itself is never read on the host.
int GroupedGemmDefaultConfig(int64_t rows, int64_t n, int64_t k, int64_t experts, bool exact) {
  const double rows_per_expert = static_cast<double>(rows) / static_cast<double>(experts);
  const auto pick = [](const char* name) { return FindGroupedGemmConfig(name); };
  // From B = 1024 tokens at DeepSeek-V3 shapes: GEMM1 886 vs 1222 us for the best exact kernel.
  if (!exact && rows_per_expert >= 32) return pick("wgmma_128x128_s4");
  const bool long_k = k >= 2048;
  if (rows_per_expert < (long_k ? 0.1 : 1.0)) {  // a handful of experts: split K or wide blocks
    return pick(long_k ? "register_16x8_k4_s4" : "register_64x8_k1_s4");
  }
  if (rows_per_expert <= 8) return pick("stream_32x8_s6");
  if (rows_per_expert <= 16) return pick("stream_32x16_s4");
  return pick("register_128x32_k1_s2");  // R/E = 32: 1222 vs 1539 us (GEMM1), 699 vs 830 (GEMM2)
}

cudaError_t LaunchGroupedGemm(const GroupedGemmArgs& args, int config, cudaStream_t stream) {
  const auto& table = Table();
  if (args.k <= 0 || args.k % kGroupSize || args.n % kRowAlignment || args.experts < 1 ||
      args.experts > kMaxExperts || config < 0 || config >= static_cast<int>(table.size())) {
    return cudaErrorInvalidValue;
  }
  if (args.rows == 0 || args.n == 0) return cudaSuccess;
  const KernelEntry& entry = table[config];
  int device = 0, sms = 0, blocks_per_sm = 0;
  cudaError_t status = cudaGetDevice(&device);
  if (status == cudaSuccess) status = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  // Always set: the 48 KB default limit counts static shared memory (the tile table) too.
  if (status == cudaSuccess && entry.smem_bytes > 0) {
    status = cudaFuncSetAttribute(entry.kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, entry.smem_bytes);
  }
  if (status == cudaSuccess) {
    status = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks_per_sm, entry.kernel, entry.threads,
                                                           entry.smem_bytes);
  }
  if (status != cudaSuccess) return status;
  if (blocks_per_sm == 0) return cudaErrorInvalidConfiguration;
  return Launch(entry.kernel, sms * blocks_per_sm, entry.threads, entry.smem_bytes, stream, args);
}

}  // namespace w4afp8
