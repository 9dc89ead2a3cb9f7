// FFI handler for w4afp8_deepseek_topk: checks dtypes, shapes and sizes, then LaunchDeepseekTopk.
#include "deepseek_topk.h"
#include "ffi_common.h"
#include "handlers.h"
#include "kernel_limits.h"

namespace w4afp8 {
namespace {

ffi::Error DeepseekTopk(cudaStream_t stream, ffi::AnyBuffer logits, F32Vector bias, ffi::Result<F32Matrix> topk_weights,
                        S32MatrixOut topk_ids, int32_t top_k, int32_t n_group, int32_t topk_group, bool has_bias,
                        bool renormalize) {
  constexpr const char* kFn = "deepseek_topk";
  const auto type = logits.element_type();
  if (type != ffi::DataType::F32 && type != ffi::DataType::BF16) {
    return InvalidArgument("w4afp8_jax.deepseek_topk: logits must be float32 or bfloat16");
  }
  W4AFP8_RETURN_IF_ERROR(CheckShape(kFn, "logits", logits.dimensions(), {-1, -1}));
  const int64_t num_tokens = logits.dimensions()[0], num_experts = logits.dimensions()[1];
  if (num_experts < 1 || num_experts > kMaxExperts) {
    return InvalidArgument("w4afp8_jax.deepseek_topk: the number of experts must be in [1, " +
                           std::to_string(kMaxExperts) + "], got " + std::to_string(num_experts));
  }
  // The kernel's invariants (the Python wrapper raises clearer errors first).
  if (n_group < 1 || num_experts % n_group != 0 || num_experts / n_group < 2) {
    return InvalidArgument("w4afp8_jax.deepseek_topk: n_group = " + std::to_string(n_group) +
                           " must divide the number of experts " + std::to_string(num_experts) +
                           " into groups of at least 2");
  }
  if (topk_group < 1 || topk_group > n_group) return InvalidArgument("w4afp8_jax.deepseek_topk: topk_group out of range");
  if (top_k < 1 || top_k > topk_group * (num_experts / n_group)) {
    return InvalidArgument("w4afp8_jax.deepseek_topk: top_k out of range");
  }
  W4AFP8_RETURN_IF_ERROR(CheckShape(kFn, "bias", bias.dimensions(), {has_bias ? num_experts : 0}));
  W4AFP8_RETURN_IF_ERROR(CheckShape(kFn, "topk_weights", topk_weights->dimensions(), {num_tokens, top_k}));
  W4AFP8_RETURN_IF_ERROR(CheckShape(kFn, "topk_ids", topk_ids->dimensions(), {num_tokens, top_k}));
  return LaunchStatus(LaunchDeepseekTopk(logits.untyped_data(), type == ffi::DataType::BF16,
                                         has_bias ? bias.typed_data() : nullptr, topk_weights->typed_data(),
                                         topk_ids->typed_data(), num_tokens, static_cast<int>(num_experts), n_group,
                                         topk_group, top_k, renormalize, stream),
                      kFn);
}

}  // namespace
}  // namespace w4afp8

XLA_FFI_DEFINE_HANDLER_SYMBOL(w4afp8_deepseek_topk, w4afp8::DeepseekTopk,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<w4afp8::Stream>()
                                  .Arg<xla::ffi::AnyBuffer>()   // logits [M, E], f32 or bf16
                                  .Arg<w4afp8::F32Vector>()     // bias [E] when has_bias, else [0]
                                  .Ret<w4afp8::F32Matrix>()     // topk_weights [M, top_k]
                                  .Ret<w4afp8::S32Matrix>()     // topk_ids [M, top_k], decreasing biased score
                                  .Attr<int32_t>("top_k")       // experts per token
                                  .Attr<int32_t>("n_group")     // expert groups (E / n_group experts each)
                                  .Attr<int32_t>("topk_group")  // groups kept per token
                                  .Attr<bool>("has_bias")       // bias is [E] (else [0] and ignored)
                                  .Attr<bool>("renormalize"),   // weights divided by their sum
                              {w4afp8::kGraphSafe});
