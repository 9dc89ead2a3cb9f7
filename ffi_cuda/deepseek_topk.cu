// DeepSeek-V3 grouped top-k router, one warp per token. The arithmetic is the reference's
// (w4afp8_jax/ops/deepseek_topk.py) operation for operation, so ids and weights agree bitwise
// wherever XLA's exp and division agree with CUDA's:
//   score = 1 / (1 + expf(-x))  (IEEE division, accurate expf: no fast-math flags);
//   biased = score + bias;
//   group score = the sum of the group's two largest biased values;
//   weight = score * (1 / (score_0 + score_1 + ... in slot order)), IEEE division (the form XLA
//            gives a division by a broadcast sum, so the reference writes it so too).
// Selection compares int32 keys that order floats like `<` does (-0 == +0) and put NaN below
// every number (and "not a candidate" below NaN): a NaN logit or bias never wins over a number,
// every id stays in [0, E) and distinct, and ties always go to the lower index.
#include <cuda_bf16.h>

#include <algorithm>
#include <limits>
#include <type_traits>

#include "deepseek_topk.h"
#include "kernel_limits.h"

namespace w4afp8 {
namespace {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kMaxWarpsPerBlock = 4;
constexpr int kSharedBudget = 48 * 1024;  // static limit without opting in to more
constexpr int kIntMax = std::numeric_limits<int>::max();
constexpr int kMaskedKey = std::numeric_limits<int>::min();  // outside the kept groups, already chosen, or no entry
constexpr int kNanKey = kMaskedKey + 1;  // NaN: below every number, above kMaskedKey

__device__ __forceinline__ float LoadLogit(const float* p) { return *p; }
__device__ __forceinline__ float LoadLogit(const __nv_bfloat16* p) { return __bfloat162float(*p); }

// Key(a) > Key(b) iff a > b for non-NaN floats; -0 and +0 share key 0. Non-NaN keys lie in
// [Key(-inf), Key(+inf)] = [-2139095041, 2139095040], above kNanKey.
__device__ __forceinline__ int OrderedKey(float v) {
  if (v != v) return kNanKey;
  if (v == 0.0f) return 0;
  const int bits = __float_as_int(v);
  return bits >= 0 ? bits : bits ^ 0x7fffffff;
}

// Inverse of OrderedKey for non-NaN keys; kNanKey and kMaskedKey map to NaN bit patterns.
__device__ __forceinline__ float KeyValue(int key) { return __int_as_float(key >= 0 ? key : key ^ 0x7fffffff); }

// group_keys[g] = OrderedKey(sum of group g's two largest biased values). A group is scanned by a
// power-of-two run of lanes (4 lanes per group at 8 groups), merged with xor shuffles.
__device__ void ScoreGroups(const int* keys, int n_group, int per_group, int lane, int* group_keys) {
  int groups_per_pass = 1;
  while (groups_per_pass < n_group && groups_per_pass < 32) groups_per_pass *= 2;
  const int lanes = 32 / groups_per_pass;
  const int sub = lane % lanes;
  for (int base = 0; base < n_group; base += groups_per_pass) {  // warp-uniform trip count
    const int g = base + lane / lanes;
    int first = kMaskedKey, second = kMaskedKey;
    if (g < n_group) {
      for (int e = g * per_group + sub; e < (g + 1) * per_group; e += lanes) {
        const int k = keys[e];
        if (k > first) {
          second = first;
          first = k;
        } else if (k > second) {
          second = k;
        }
      }
    }
    for (int offset = lanes / 2; offset > 0; offset /= 2) {
      const int other_first = __shfl_xor_sync(kFullMask, first, offset);
      const int other_second = __shfl_xor_sync(kFullMask, second, offset);
      second = max(min(first, other_first), max(second, other_second));
      first = max(first, other_first);
    }
    // per_group >= 2, so both are real entries: the values are the biased scores bitwise.
    if (sub == 0 && g < n_group) group_keys[g] = OrderedKey(KeyValue(first) + KeyValue(second));
  }
}

// The largest of this lane's keys (experts lane + 32 j), lowest expert on ties.
template <int kSlots>
__device__ __forceinline__ void LocalBest(const int (&own)[kSlots], int lane, int& best_key, int& best_id) {
  best_key = kMaskedKey;
  best_id = kIntMax;
#pragma unroll
  for (int j = 0; j < kSlots; ++j) {
    if (own[j] > best_key) {
      best_key = own[j];
      best_id = lane + 32 * j;
    }
  }
}

// kSlots >= ceil(E / 32): each lane also keeps the keys of its experts lane + 32 j in registers
// for the top-k rounds.
template <typename T, int kSlots>
__global__ void __launch_bounds__(kMaxWarpsPerBlock * 32)
    DeepseekTopkKernel(const T* __restrict__ logits, const float* __restrict__ bias, float* __restrict__ topk_weights,
                       int32_t* __restrict__ topk_ids, int64_t num_tokens, int num_experts, int n_group,
                       int topk_group, int top_k, bool renormalize) {
  extern __shared__ int shared[];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t token = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + warp;
  if (token >= num_tokens) return;  // whole warps only
  int* keys = shared + warp * (2 * num_experts + 2 * n_group + top_k);  // [E] selection keys
  float* scores = reinterpret_cast<float*>(keys + num_experts);          // [E] unbiased scores
  int* group_keys = keys + 2 * num_experts;                              // [n_group]
  int* group_kept = group_keys + n_group;                                // [n_group]
  int* chosen = group_kept + n_group;                                    // [top_k] ids in order
  const int per_group = num_experts / n_group;

  const T* row = logits + token * num_experts;
  int own[kSlots];  // keys of experts lane + 32 j; kMaskedKey past E
#pragma unroll
  for (int j = 0; j < kSlots; ++j) {
    const int e = lane + 32 * j;
    own[j] = kMaskedKey;
    if (e < num_experts) {
      const float s = 1.0f / (1.0f + expf(-LoadLogit(row + e)));
      scores[e] = s;
      own[j] = keys[e] = OrderedKey(bias != nullptr ? s + bias[e] : s);
    }
  }
  __syncwarp();

  if (topk_group < n_group) {  // otherwise every group is kept and group scores do not matter
    ScoreGroups(keys, n_group, per_group, lane, group_keys);
    __syncwarp();
    // A group is kept when fewer than topk_group groups beat it (ties: lower group first).
    for (int g = lane; g < n_group; g += 32) {
      const int key = group_keys[g];
      int rank = 0;
      for (int h = 0; h < n_group; ++h) rank += group_keys[h] > key || (group_keys[h] == key && h < g);
      group_kept[g] = rank < topk_group;
    }
    __syncwarp();
#pragma unroll
    for (int j = 0; j < kSlots; ++j) {
      const int e = lane + 32 * j;
      if (e < num_experts && !group_kept[e / per_group]) own[j] = kMaskedKey;
    }
  }

  // top_k rounds of a warp-wide argmax over the lanes' best keys. The kept groups hold >= top_k
  // candidates, all with keys above kMaskedKey, so every round's winner is a real, not yet
  // chosen expert.
  int best_key, best_id;
  LocalBest(own, lane, best_key, best_id);
  for (int r = 0; r < top_k; ++r) {
    const int win_key = __reduce_max_sync(kFullMask, best_key);
    const int win = __reduce_min_sync(kFullMask, best_key == win_key ? best_id : kIntMax);
    if (lane == 0) chosen[r] = win;
    if (win % 32 == lane) {
#pragma unroll
      for (int j = 0; j < kSlots; ++j) {
        if (lane + 32 * j == win) own[j] = kMaskedKey;
      }
      LocalBest(own, lane, best_key, best_id);
    }
  }
  __syncwarp();

  // The same slot-order sum in every lane; a sum of 0 (every chosen score underflowed, logits
  // below about -88) gives uniform weights instead of 0 / 0.
  float total = 0.0f;
  if (renormalize) {
    total = scores[chosen[0]];
    for (int r = 1; r < top_k; ++r) total += scores[chosen[r]];
  }
  const float inverse = 1.0f / total;
  for (int r = lane; r < top_k; r += 32) {
    const int id = chosen[r];
    const float s = scores[id];
    topk_ids[token * top_k + r] = id;
    topk_weights[token * top_k + r] =
        !renormalize ? s : (total == 0.0f ? 1.0f / static_cast<float>(top_k) : s * inverse);
  }
}

}  // namespace

cudaError_t LaunchDeepseekTopk(const void* logits, bool logits_bf16, const float* bias, float* topk_weights,
                               int32_t* topk_ids, int64_t num_tokens, int num_experts, int n_group, int topk_group,
                               int top_k, bool renormalize, cudaStream_t stream) {
  if (num_tokens == 0) return cudaSuccess;
  const size_t warp_bytes = sizeof(int) * (2 * static_cast<size_t>(num_experts) + 2 * n_group + top_k);
  const int warps = static_cast<int>(std::clamp<size_t>(kSharedBudget / warp_bytes, 1, kMaxWarpsPerBlock));
  const int64_t blocks = (num_tokens + warps - 1) / warps;
  if (blocks > kIntMax) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(blocks)), block(32 * warps);
  const size_t shared_bytes = warps * warp_bytes;
  const int slots = (num_experts + 31) / 32;
  const auto launch = [&](auto slots_tag) {
    constexpr int kSlots = decltype(slots_tag)::value;
    if (logits_bf16) {
      DeepseekTopkKernel<__nv_bfloat16, kSlots><<<grid, block, shared_bytes, stream>>>(
          static_cast<const __nv_bfloat16*>(logits), bias, topk_weights, topk_ids, num_tokens, num_experts, n_group,
          topk_group, top_k, renormalize);
    } else {
      DeepseekTopkKernel<float, kSlots><<<grid, block, shared_bytes, stream>>>(
          static_cast<const float*>(logits), bias, topk_weights, topk_ids, num_tokens, num_experts, n_group,
          topk_group, top_k, renormalize);
    }
  };
  static_assert(kMaxExperts <= 32 * 32, "one warp holds at most 32 keys per lane");
  if (slots <= 1) {
    launch(std::integral_constant<int, 1>());
  } else if (slots <= 2) {
    launch(std::integral_constant<int, 2>());
  } else if (slots <= 4) {
    launch(std::integral_constant<int, 4>());
  } else if (slots <= 8) {
    launch(std::integral_constant<int, 8>());
  } else if (slots <= 16) {
    launch(std::integral_constant<int, 16>());
  } else {
    launch(std::integral_constant<int, 32>());
  }
  return cudaGetLastError();
}

}  // namespace w4afp8
