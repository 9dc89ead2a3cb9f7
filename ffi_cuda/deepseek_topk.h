// Step 0: DeepSeek-V3's grouped top-k router (noaux_tc): sigmoid scores, biased selection
// restricted to the best expert groups, renormalized unbiased weights.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace w4afp8 {

// logits: [num_tokens, num_experts], f32 (logits_bf16 = false) or bf16 (true), row-major.
// bias: [num_experts] f32 added to the scores for selection only, or nullptr for none.
// Writes topk_weights f32 and topk_ids int32, both [num_tokens, top_k]: ids in decreasing
// biased-score order (ties: lower expert index first), weights the unbiased scores
// 1 / (1 + expf(-x)) of those experts, times 1 / (their sum, added in slot order) when
// renormalize (1 / top_k each where that sum is 0). The arguments must satisfy (the FFI handler checks them):
//   1 <= num_experts <= kMaxExperts, num_experts % n_group == 0, num_experts / n_group >= 2,
//   1 <= topk_group <= n_group, 1 <= top_k <= topk_group * (num_experts / n_group).
// Any logit and bias values are accepted (NaN ranks below every number; see the .cu file).
// One warp per token; the launch depends on the sizes only; num_tokens = 0 launches nothing.
cudaError_t LaunchDeepseekTopk(const void* logits, bool logits_bf16, const float* bias, float* topk_weights,
                               int32_t* topk_ids, int64_t num_tokens, int num_experts, int n_group, int topk_group,
                               int top_k, bool renormalize, cudaStream_t stream);

}  // namespace w4afp8
