// Registers the native kernels as torch.ops.fastppo.* (see fastppo/ops/native.py for the autograd side), and the
// module that loading them needs: fastppo._C when setup.py builds it, fastppo_C when it is compiled on first use
// (fastppo/ops/native_build.py); TORCH_EXTENSION_NAME is whichever name the build gave.

#include <torch/extension.h>

#include "common.h"

TORCH_LIBRARY(fastppo, m) {
  m.def("token_logprobs_forward(Tensor logits, Tensor tokens, float inv_temperature) -> Tensor[]");
  m.def("token_logprobs_backward(Tensor logits, Tensor tokens, Tensor lse, Tensor entropy, Tensor grad_logprobs, "
        "Tensor? grad_entropy, float inv_temperature) -> Tensor");
  m.def("sample_tokens(Tensor logits, Tensor uniform, float inv_temperature) -> Tensor[]");
  m.def("decode_attention(Tensor qkv, Tensor cos, Tensor sin, Tensor(a!) keys, Tensor(b!) values, Tensor key_mask, "
        "int heads, float scale) -> Tensor");
  m.def("kl_penalty_forward(Tensor logprobs, Tensor ref_logprobs, int estimator) -> Tensor");
  m.def("kl_penalty_backward(Tensor logprobs, Tensor ref_logprobs, Tensor grad, int estimator) -> Tensor");
  m.def("shape_rewards(Tensor scores, Tensor logprobs, Tensor ref_logprobs, Tensor response_mask, float kl_coef, "
        "int estimator) -> Tensor[]");
  m.def("gae(Tensor rewards, Tensor values, Tensor response_mask, float gamma, Tensor? lam_per_row, float lam, "
        "float critic_lam) -> Tensor[]");
  m.def("length_adaptive_lam(Tensor response_mask, float alpha) -> Tensor");
  m.def("group_advantages(Tensor scores, int group_size, int estimator, float eps) -> Tensor");
  m.def("masked_whiten(Tensor x, Tensor mask, bool shift_mean, float eps) -> Tensor");
  m.def("ppo_policy_loss(Tensor logprobs, Tensor old_logprobs, Tensor advantages, Tensor response_mask, "
        "float clip_low, float clip_high, float dual_clip, int agg, float denominator, Tensor? ref_logprobs, "
        "float kl_loss_coef, int kl_estimator, Tensor? token_weights=None) -> Tensor[]");
  m.def("ppo_value_loss(Tensor values, Tensor old_values, Tensor returns, Tensor response_mask, float clip, "
        "int agg, float denominator) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(fastppo, CPU, m) {
  m.impl("token_logprobs_forward", &fastppo::token_logprobs_forward);
  m.impl("token_logprobs_backward", &fastppo::token_logprobs_backward);
  m.impl("sample_tokens", &fastppo::sample_tokens);
  m.impl("decode_attention", &fastppo::decode_attention);
  m.impl("kl_penalty_forward", &fastppo::kl_penalty_forward);
  m.impl("kl_penalty_backward", &fastppo::kl_penalty_backward);
  m.impl("shape_rewards", &fastppo::shape_rewards);
  m.impl("gae", &fastppo::gae);
  m.impl("length_adaptive_lam", &fastppo::length_adaptive_lam);
  m.impl("group_advantages", &fastppo::group_advantages);
  m.impl("masked_whiten", &fastppo::masked_whiten);
  m.impl("ppo_policy_loss", &fastppo::ppo_policy_loss);
  m.impl("ppo_value_loss", &fastppo::ppo_value_loss);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "fastppo native CPU kernels; the ops are registered as torch.ops.fastppo.*";
  module.def("build_info", [] {
    pybind11::dict info;
    info["threads"] = at::get_num_threads();
    info["parallel"] = at::get_parallel_info();
    info["cuda"] = false;
    return info;
  });
}
