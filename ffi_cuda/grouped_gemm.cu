// Steps 3 and 5: the grouped GEMM's configuration table, the heuristic that picks one from the
// static sizes, and the launcher. The kernel families live in grouped_gemm/ (one header per
// family, built from the shared ptx, operand, MMA, schedule and epilogue headers).
#include <cudaTypedefs.h>

#include <array>

#include "grouped_gemm.h"
#include "grouped_gemm/register_kernel.cuh"
#include "grouped_gemm/stream_kernel.cuh"
#include "grouped_gemm/tma_kernel.cuh"
#include "grouped_gemm/wgmma_kernel.cuh"
#include "kernel_limits.h"
#include "launch.cuh"

namespace w4afp8 {
namespace {

using gemm::RegisterConfig;
using gemm::StreamConfig;
using gemm::TmaConfig;
using gemm::WgmmaConfig;

struct KernelEntry {
  const void* kernel;  // for its attributes and occupancy
  int threads;
  int smem_bytes;  // dynamic shared memory
  GroupedGemmConfig info;
  cudaError_t (*launch)(const GroupedGemmArgs& args, int grid, cudaStream_t stream);
};

template <class Cfg, auto kKernel, int kSmemBytes>
cudaError_t LaunchPlain(const GroupedGemmArgs& args, int grid, cudaStream_t stream) {
  return Launch(kKernel, grid, Cfg::kThreads, kSmemBytes, stream, args);
}

template <class Cfg, auto kKernel, int kSmemBytes, auto kLaunch>
KernelEntry Describe() {
  return {reinterpret_cast<const void*>(kKernel), Cfg::kThreads, kSmemBytes,
          {Cfg::Name(), Cfg::kFamily, Cfg::kExact, Cfg::kRows, Cfg::kTokens}, kLaunch};
}

template <class Cfg>
KernelEntry Register() {
  constexpr auto kernel = gemm::GroupedGemmRegisterKernel<Cfg>;
  return Describe<Cfg, kernel, 0, LaunchPlain<Cfg, kernel, 0>>();
}

template <class Cfg>
KernelEntry Stream() {
  constexpr auto kernel = gemm::GroupedGemmStreamKernel<Cfg>;
  return Describe<Cfg, kernel, Cfg::kSmemBytes, LaunchPlain<Cfg, kernel, Cfg::kSmemBytes>>();
}

KernelEntry Wgmma() {
  constexpr auto kernel = gemm::GroupedGemmWgmmaKernel<WgmmaConfig>;
  constexpr int smem = gemm::WgmmaSmemBytes<WgmmaConfig>();
  return Describe<WgmmaConfig, kernel, smem, LaunchPlain<WgmmaConfig, kernel, smem>>();
}

// The driver's tensor-map encoder, found once through the runtime (no libcuda link).
PFN_cuTensorMapEncodeTiled_v12000 TensorMapEncoder() {
  static const auto encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found{};
    const cudaError_t status =
        cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &found);
    return status == cudaSuccess && found == cudaDriverEntryPointSuccess
               ? reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn)
               : nullptr;
  }();
  return encode;
}

// A byte tensor of `rank` dimensions (innermost first; strides in bytes of dimensions 1..),
// copied in boxes of `box` bytes x rows; reads past the tensor's end are zero-filled.
cudaError_t EncodeByteTensor(CUtensorMap* map, const void* base, int rank, const cuuint64_t* dims,
                             const cuuint64_t* strides, const cuuint32_t* box, CUtensorMapSwizzle swizzle) {
  const auto encode = TensorMapEncoder();
  if (encode == nullptr) return cudaErrorNotSupported;
  const cuuint32_t element_strides[4] = {1, 1, 1, 1};
  const CUresult status = encode(map, CU_TENSOR_MAP_DATA_TYPE_UINT8, rank, const_cast<void*>(base), dims, strides,
                                 box, element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle,
                                 CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return status == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

// The TMA family's descriptors (see TmaGemmParams), over the whole stack of weight sets: the
// kernel selects the layer by coordinate.
template <class Cfg>
cudaError_t LaunchTma(const GroupedGemmArgs& args, int grid, cudaStream_t stream) {
  gemm::TmaGemmParams params{};
  params.args = args;
  const cuuint64_t stack_rows = static_cast<cuuint64_t>(args.layers) * args.experts * args.n;
  const cuuint64_t groups = args.k / kGroupSize, half_k = args.k / 2;
  cudaError_t status;
  if (args.tiled_weights) {
    const cuuint64_t dims[4] = {128, 8, groups, stack_rows / 16};
    const cuuint64_t strides[3] = {128, 1024, groups * 1024};
    const cuuint32_t box[4] = {128, 8, 1, Cfg::kRows / 16};
    status = EncodeByteTensor(&params.weights, args.packed, 4, dims, strides, box, CU_TENSOR_MAP_SWIZZLE_128B);
  } else {
    const cuuint64_t dims[2] = {half_k, stack_rows};
    const cuuint64_t strides[1] = {half_k};
    const cuuint32_t box[2] = {kGroupSize / 2, Cfg::kRows};
    status = EncodeByteTensor(&params.weights, args.packed, 2, dims, strides, box, CU_TENSOR_MAP_SWIZZLE_64B);
  }
  if (status != cudaSuccess) return status;
  const cuuint64_t lhs_dims[2] = {static_cast<cuuint64_t>(args.k), static_cast<cuuint64_t>(args.rows)};
  const cuuint64_t lhs_strides[1] = {static_cast<cuuint64_t>(args.k)};
  const cuuint32_t lhs_box[2] = {kGroupSize, Cfg::kTokens};
  status = EncodeByteTensor(&params.lhs, args.lhs, 2, lhs_dims, lhs_strides, lhs_box, CU_TENSOR_MAP_SWIZZLE_128B);
  if (status != cudaSuccess) return status;
  return Launch(gemm::GroupedGemmTmaKernel<Cfg>, grid, Cfg::kThreads, gemm::TmaSmemBytes<Cfg>(), stream, params);
}

template <class Cfg>
KernelEntry Tma() {
  constexpr auto kernel = gemm::GroupedGemmTmaKernel<Cfg>;
  return Describe<Cfg, kernel, gemm::TmaSmemBytes<Cfg>(), LaunchTma<Cfg>>();
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
      // TmaConfig<tokens per unit (the wgmma N), stages>: 64 weight rows per unit, DEFAULT only.
      Tma<TmaConfig<8, 8>>(),                     // tma_64x8_s8
      Tma<TmaConfig<16, 8>>(),                    // tma_64x16_s8
      Tma<TmaConfig<32, 6>>(),                    // tma_64x32_s6
      Tma<TmaConfig<64, 4>>(),                    // tma_64x64_s4
      Tma<TmaConfig<128, 3>>(),                   // tma_64x128_s3
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
  // (The TMA family is picked by name only until a GPU run has measured it: docs/performance.md.)
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
  return entry.launch(args, sms * blocks_per_sm, stream);
}

}  // namespace w4afp8
