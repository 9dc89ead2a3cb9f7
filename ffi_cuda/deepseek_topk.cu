// DeepSeek-V3 grouped top-k router, one warp per token, every expert's key in registers (the
// token's logits are loaded at once, groups are scored with shuffles, no shared-memory scans).
// The arithmetic is the reference's (w4afp8_jax/ops/deepseek_topk.py) operation for operation,
// so ids and weights agree bitwise wherever XLA's exp and division agree with CUDA's:
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
#include "launch.cuh"

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

// How a token's experts lie over its warp: each lane holds `slots` consecutive experts of its
// groups, and a group is either a power-of-two run of lanes (merged with xor shuffles) or a
// run of one lane's slots. With n_group <= 32, group g spans lanes [g L, (g + 1) L) (L the
// largest power of two with n_group L <= 32) and slots = ceil(per_group / L); with more groups,
// lane l holds the G = ceil(n_group / 32) groups from l G. Either way slots <= 64 (E <= 1024),
// and lanes and slots run in expert order, so the lowest lane and slot win ties.
struct WarpLayout {
  int slots;            // experts per lane
  int piece_slots;      // min(slots, per_group): a lane's slots per group piece
  int lanes_per_group;  // L (1 when a lane holds whole groups)
  int groups_per_lane;  // G (1 when lanes share a group)
};

WarpLayout ChooseLayout(int num_experts, int n_group) {
  const int per_group = num_experts / n_group;
  if (n_group > 32) {
    const int groups = (n_group + 31) / 32;
    return {groups * per_group, per_group, 1, groups};
  }
  int lanes = 1;
  while (2 * lanes * n_group <= 32) lanes *= 2;
  const int slots = (per_group + lanes - 1) / lanes;
  return {slots, slots, lanes, 1};
}

// The largest of this lane's keys, lowest expert on ties: a tournament of depth log2(kSlots)
// (the top-k rounds wait on it) whose left side always holds the lower slots, so ties go left.
template <int kSlots>
__device__ __forceinline__ void LocalBest(const int (&key)[kSlots], const float (&score)[kSlots], int first_expert,
                                          int& best_key, int& best_id, float& best_score) {
  static_assert((kSlots & (kSlots - 1)) == 0, "a power of two");
  int k[kSlots], slot[kSlots];
  float s[kSlots];
#pragma unroll
  for (int j = 0; j < kSlots; ++j) {
    k[j] = key[j];
    slot[j] = j;
    s[j] = score[j];
  }
#pragma unroll
  for (int width = 1; width < kSlots; width *= 2) {
#pragma unroll
    for (int left = 0; left < kSlots; left += 2 * width) {
      const int right = left + width;  // slots [right, right + width) follow [left, right)
      const bool take_right = k[right] > k[left];
      k[left] = take_right ? k[right] : k[left];
      slot[left] = take_right ? slot[right] : slot[left];
      s[left] = take_right ? s[right] : s[left];
    }
  }
  best_key = k[0];
  best_id = k[0] == kMaskedKey ? kIntMax : first_expert + slot[0];
  best_score = s[0];
}

// kSlots >= layout.slots: a lane's keys and scores stay in registers. Per warp, shared memory
// holds the group keys and kept flags [n_group] and the chosen ids and scores [top_k].
template <typename T, int kSlots>
__global__ void __launch_bounds__(kMaxWarpsPerBlock * 32)
    DeepseekTopkKernel(const T* __restrict__ logits, const float* __restrict__ bias, float* __restrict__ topk_weights,
                       int32_t* __restrict__ topk_ids, int64_t num_tokens, int num_experts, int n_group,
                       int topk_group, int top_k, bool renormalize, WarpLayout layout) {
  BeginKernel();
  extern __shared__ int shared[];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t token = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + warp;
  if (token >= num_tokens) return;  // whole warps only
  // group_kept does not follow group_keys: the rank loop's compiled remainder reads group_keys
  // in 8-byte pairs, one int past the end (value unused), which must not be an entry that other
  // lanes are writing (racecheck reported it when group_kept came next).
  int* group_keys = shared + warp * (2 * n_group + 2 * top_k);     // [n_group]
  int* chosen = group_keys + n_group;                              // [top_k] ids in slot order
  float* chosen_score = reinterpret_cast<float*>(chosen + top_k);  // [top_k]
  int* group_kept = reinterpret_cast<int*>(chosen_score + top_k);  // [n_group]
  const int per_group = num_experts / n_group;
  const int lane_in_group = lane % layout.lanes_per_group;
  const int first_group = lane / layout.lanes_per_group * layout.groups_per_lane;
  const int first_expert = first_group * per_group + lane_in_group * layout.slots;
  const int count = max(0, min(min(layout.groups_per_lane * per_group - lane_in_group * layout.slots,
                                   num_experts - first_expert),
                               layout.slots));  // real experts of this lane

  // Every load first (they are independent), then the arithmetic.
  const T* row = logits + token * num_experts;
  float logit[kSlots], bias_of[kSlots];
#pragma unroll
  for (int j = 0; j < kSlots; ++j) {
    const int e = first_expert + j;
    const bool real = j < count;
    logit[j] = real ? LoadLogit(row + e) : 0.0f;
    bias_of[j] = real && bias != nullptr ? bias[e] : 0.0f;
  }
  int key[kSlots];  // kMaskedKey where there is no expert
  float score[kSlots];
#pragma unroll
  for (int j = 0; j < kSlots; ++j) {
    const bool real = j < count;
    score[j] = 1.0f / (1.0f + expf(-logit[j]));
    key[j] = real ? OrderedKey(bias != nullptr ? score[j] + bias_of[j] : score[j]) : kMaskedKey;
  }

  if (topk_group < n_group) {  // otherwise every group is kept and group scores do not matter
    // Group score = the sum of its two largest biased values: the top two of each group piece,
    // merged over the group's lanes. The loop bounds and shuffles are warp-uniform.
    // (Group indices advance per piece: no integer division per slot.)
    int first = kMaskedKey, second = kMaskedKey, group = first_group, in_piece = 0;
#pragma unroll
    for (int j = 0; j < kSlots; ++j) {
      if (j >= layout.slots) break;
      if (key[j] > first) {
        second = first;
        first = key[j];
      } else if (key[j] > second) {
        second = key[j];
      }
      if (++in_piece < layout.piece_slots) continue;
      for (int offset = layout.lanes_per_group / 2; offset > 0; offset /= 2) {
        const int other_first = __shfl_xor_sync(kFullMask, first, offset);
        const int other_second = __shfl_xor_sync(kFullMask, second, offset);
        second = max(min(first, other_first), max(second, other_second));
        first = max(first, other_first);
      }
      // per_group >= 2, so both are real entries: the values are the biased scores bitwise.
      if (lane_in_group == 0 && group < n_group) {
        group_keys[group] = OrderedKey(KeyValue(first) + KeyValue(second));
      }
      first = second = kMaskedKey;
      in_piece = 0;
      ++group;
    }
    __syncwarp();
    // A group is kept when fewer than topk_group groups beat it (ties: lower group first).
    for (int g = lane; g < n_group; g += 32) {
      const int own = group_keys[g];
      int rank = 0;
      for (int h = 0; h < n_group; ++h) rank += group_keys[h] > own || (group_keys[h] == own && h < g);
      group_kept[g] = rank < topk_group;
    }
    __syncwarp();
    group = first_group;
    in_piece = 0;
#pragma unroll
    for (int j = 0; j < kSlots; ++j) {
      if (key[j] != kMaskedKey && !group_kept[group]) key[j] = kMaskedKey;
      if (++in_piece == layout.piece_slots) {
        in_piece = 0;
        ++group;
      }
    }
  }

  // top_k rounds of a warp-wide argmax over the lanes' best keys. The kept groups hold >= top_k
  // candidates, all with keys above kMaskedKey, so every round's winner is a real, not yet
  // chosen expert. Its score comes from its lane; the sum runs in slot order in every lane.
  int best_key, best_id;
  float best_score;
  LocalBest(key, score, first_expert, best_key, best_id, best_score);
  float total = 0.0f;
  for (int r = 0; r < top_k; ++r) {
    const int win_key = __reduce_max_sync(kFullMask, best_key);
    const int win = __reduce_min_sync(kFullMask, best_key == win_key ? best_id : kIntMax);
    const int owner = __ffs(__ballot_sync(kFullMask, best_id == win)) - 1;
    const float win_score = __shfl_sync(kFullMask, best_score, owner);
    total = r == 0 ? win_score : total + win_score;
    if (lane == 0) {
      chosen[r] = win;
      chosen_score[r] = win_score;
    }
    if (lane == owner) {
#pragma unroll
      for (int j = 0; j < kSlots; ++j) {
        if (first_expert + j == win) key[j] = kMaskedKey;
      }
      LocalBest(key, score, first_expert, best_key, best_id, best_score);
    }
  }
  __syncwarp();

  // A sum of 0 (every chosen score underflowed, logits below about -88) gives uniform weights
  // instead of 0 / 0.
  const float inverse = 1.0f / total;
  for (int r = lane; r < top_k; r += 32) {
    const float s = chosen_score[r];
    topk_ids[token * top_k + r] = chosen[r];
    topk_weights[token * top_k + r] =
        !renormalize ? s : (total == 0.0f ? 1.0f / static_cast<float>(top_k) : s * inverse);
  }
}

}  // namespace

cudaError_t LaunchDeepseekTopk(const void* logits, bool logits_bf16, const float* bias, float* topk_weights,
                               int32_t* topk_ids, int64_t num_tokens, int num_experts, int n_group, int topk_group,
                               int top_k, bool renormalize, cudaStream_t stream) {
  if (num_tokens == 0) return cudaSuccess;
  const WarpLayout layout = ChooseLayout(num_experts, n_group);
  const size_t warp_bytes = sizeof(int) * (2 * static_cast<size_t>(n_group) + 2 * top_k);
  const int warps = static_cast<int>(std::clamp<size_t>(kSharedBudget / warp_bytes, 1, kMaxWarpsPerBlock));
  const int64_t blocks = (num_tokens + warps - 1) / warps;
  if (blocks > kIntMax) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(blocks)), block(32 * warps);
  const size_t shared_bytes = warps * warp_bytes;
  const auto launch = [&](auto slots_tag) {
    constexpr int kSlots = decltype(slots_tag)::value;
    if (logits_bf16) {
      return Launch(DeepseekTopkKernel<__nv_bfloat16, kSlots>, grid, block, shared_bytes, stream,
                    static_cast<const __nv_bfloat16*>(logits), bias, topk_weights, topk_ids, num_tokens, num_experts,
                    n_group, topk_group, top_k, renormalize, layout);
    }
    return Launch(DeepseekTopkKernel<float, kSlots>, grid, block, shared_bytes, stream,
                  static_cast<const float*>(logits), bias, topk_weights, topk_ids, num_tokens, num_experts, n_group,
                  topk_group, top_k, renormalize, layout);
  };
  static_assert(kMaxExperts <= 1024, "ChooseLayout keeps slots <= 64 up to 1024 experts");
  if (layout.slots <= 1) return launch(std::integral_constant<int, 1>());
  if (layout.slots <= 2) return launch(std::integral_constant<int, 2>());
  if (layout.slots <= 4) return launch(std::integral_constant<int, 4>());
  if (layout.slots <= 8) return launch(std::integral_constant<int, 8>());
  if (layout.slots <= 16) return launch(std::integral_constant<int, 16>());
  if (layout.slots <= 32) return launch(std::integral_constant<int, 32>());
  return launch(std::integral_constant<int, 64>());
}

}  // namespace w4afp8
