// Shared by fastppo's native CPU kernels: the vectorizable exp, the SIMD dispatch attribute, work-splitting and
// input-checking helpers, and the declarations of every op (registered as torch.ops.fastppo.* in bindings.cpp).
//
// Each op is the C++ twin of a function in fastppo/ops/reference.py (the specification) and of a Triton kernel in
// kernels/. Inputs may be fp32, bf16 or fp16; math is done in float32 (double for reductions that sum many terms).
// Padded positions are selected away, never multiplied by the mask, so nan or inf garbage there cannot leak out.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <vector>

namespace fastppo {

using at::Tensor;

// The hot loops are compiled for AVX-512, AVX2 and baseline x86-64 and the CPU picks its best at load time (an
// ifunc), so a wheel built here runs on any x86-64 and no -march flag is needed.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FASTPPO_SIMD __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FASTPPO_SIMD
#endif

// exp that vectorizes: 2^(x log2 e) with a degree-6 polynomial for 2^f on [-1/2, 1/2] and the exponent written into
// the float's bits. Relative error < 2e-7 (about 2 ulp); exactly 0 below -87 (so p log p = 0 at a -inf logit), inf
// above 88. std::exp in a loop does not vectorize without -ffast-math, which would also break inf/nan handling.
static inline float fast_exp(float x) {
  const float clamped = std::min(std::max(x, -87.0f), 88.0f);
  const float t = clamped * 1.44269504088896341f;  // log2(e)
  // Round to nearest by the 1.5 * 2^23 trick: plain adds, so it vectorizes on any x86-64 (nearbyint needs SSE4.1).
  const float n = (t + 12582912.0f) - 12582912.0f;
  const float f = t - n;  // in [-1/2, 1/2]
  float p = 1.5403530393381606e-4f;
  p = p * f + 1.3333558146428443e-3f;
  p = p * f + 9.6181291076284772e-3f;
  p = p * f + 5.5504108664821580e-2f;
  p = p * f + 2.4022650695910071e-1f;
  p = p * f + 6.9314718055994531e-1f;
  p = p * f + 1.0f;
  int32_t bits;
  std::memcpy(&bits, &p, sizeof(bits));
  bits += static_cast<int32_t>(n) << 23;
  float result;
  std::memcpy(&result, &bits, sizeof(result));
  result = x < -87.0f ? 0.0f : result;
  return x > 88.0f ? std::numeric_limits<float>::infinity() : result;
}

// e^{-d} - 1 + d (the k3 KL estimator, and PPO's approx KL) without the cancellation of its terms near d = 0: the
// Taylor series sum_{k>=2} (-d)^k / k! up to k = 10 for |d| < 1/2 (truncation < 1e-10 relative), fast_exp beyond
// (where the result is > 0.1, so fast_exp's 2e-7 costs < 3e-6 relative). Both are computed and one is selected:
// no branch, so the loops that call it vectorize.
static inline float exp_neg_minus_one_plus(float d) {
  const float x = -d;
  float series = 1.0f / 3628800;
  series = series * x + 1.0f / 362880;
  series = series * x + 1.0f / 40320;
  series = series * x + 1.0f / 5040;
  series = series * x + 1.0f / 720;
  series = series * x + 1.0f / 120;
  series = series * x + 1.0f / 24;
  series = series * x + 1.0f / 6;
  series = series * x + 0.5f;
  series *= x * x;
  const float direct = (fast_exp(x) - 1.0f) + d;
  return std::abs(d) < 0.5f ? series : direct;
}

// Rows per at::parallel_for task, so that a task holds at least ATen's grain (32k elements). Small inputs then run
// on the calling thread: waking the OpenMP team costs more than a (64, 512) scan, and on a busy machine much more.
inline int64_t row_grain(int64_t row_length) {
  return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(row_length, 1));
}

// Switch over the logit dtypes the kernels take: float32, bfloat16, float16 (float64 goes to the reference).
#define FASTPPO_DISPATCH_LOGITS(TYPE, NAME, ...) \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) AT_DISPATCH_CASE_REDUCED_FLOATING_TYPES(__VA_ARGS__))

inline void check_cpu(const Tensor& x, const char* name) {
  TORCH_CHECK(x.device().is_cpu(), "fastppo native kernels take CPU tensors, but ", name, " is on ", x.device());
}

inline void check_float(const Tensor& x, const char* name) {
  check_cpu(x, name);
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), name, " must be a floating-point tensor, got ", x.scalar_type());
}

// x (B, T) floating point, shaped like the mask.
inline void check_bt(const Tensor& x, const Tensor& mask, const char* name) {
  check_float(x, name);
  check_cpu(mask, "response_mask");
  TORCH_CHECK(x.dim() == 2 && x.sizes() == mask.sizes(), name, " must be (B, T) like response_mask ",
              mask.sizes(), ", got ", x.sizes());
}

// An input as contiguous float32 (a no-op for contiguous float32 input). Masks too: bool, integer or float masks
// all become 1 (valid) / 0 (padding).
inline Tensor as_f32(const Tensor& x) { return x.to(at::kFloat).contiguous(); }

// ---------------------------------------------------------------------------------------------------------------
// The ops. Estimators: 0 k1, 1 k2, 2 k3, 3 abs. agg: 0 token-mean, 1 seq-mean-token-mean, 2 seq-mean-token-sum.
// "None" arguments travel as negative numbers (dual_clip, value clip, denominator).
// ---------------------------------------------------------------------------------------------------------------

// logits (N, V) with unit stride along V, tokens (N,) int64 -> [logprobs, entropy, logsumexp], each (N,) float32.
std::vector<Tensor> token_logprobs_forward(const Tensor& logits, const Tensor& tokens, double inv_temperature);
// -> d loss / d logits (N, V) in the logits' dtype.
Tensor token_logprobs_backward(const Tensor& logits, const Tensor& tokens, const Tensor& lse, const Tensor& entropy,
                               const Tensor& grad_logprobs, const std::optional<Tensor>& grad_entropy,
                               double inv_temperature);

// logits (B, V) with unit stride along V, uniform (B,) in [0, 1) -> {(B,) int64 tokens drawn from
// softmax(logits * inv_temperature), (B,) float32 their log-probs}; -1 (nan) for a row that is no distribution.
std::vector<Tensor> sample_tokens(const Tensor& logits, const Tensor& uniform, double inv_temperature);

// qkv (B, (heads + 2 G) D), cos/sin (B, D), keys/values (B, G, L, D) written at n - 1, key_mask (B, n) -> (B, heads D).
Tensor decode_attention(const Tensor& qkv, const Tensor& cos, const Tensor& sin, Tensor& keys, Tensor& values,
                        const Tensor& key_mask, int64_t heads, double scale);

Tensor kl_penalty_forward(const Tensor& logprobs, const Tensor& ref_logprobs, int64_t estimator);
Tensor kl_penalty_backward(const Tensor& logprobs, const Tensor& ref_logprobs, const Tensor& grad, int64_t estimator);
std::vector<Tensor> shape_rewards(const Tensor& scores, const Tensor& logprobs, const Tensor& ref_logprobs,
                                  const Tensor& response_mask, double kl_coef, int64_t estimator);
// lam_per_row (B,) or, when absent, lam for every row; critic_lam < 0: returns = advantages + values.
std::vector<Tensor> gae(const Tensor& rewards, const Tensor& values, const Tensor& response_mask, double gamma,
                        const std::optional<Tensor>& lam_per_row, double lam, double critic_lam);
// -> (B,) float32: clamp(1 - 1 / (alpha * valid tokens of the row), 0, 1).
Tensor length_adaptive_lam(const Tensor& response_mask, double alpha);
// scores (B,), consecutive groups of group_size; estimator 0 grpo, 1 dr_grpo, 2 rloo -> (B,) float32 advantages.
Tensor group_advantages(const Tensor& scores, int64_t group_size, int64_t estimator, double eps);
Tensor masked_whiten(const Tensor& x, const Tensor& mask, bool shift_mean, double eps);

// -> [loss (), d loss / d logprobs (B, T) float32, stats (6,): clip, dual clip, approx kl, ratio mean, ratio max,
// ref kl (0 without ref_logprobs)]. With ref_logprobs, kl_loss_coef * kl(logprobs - ref_logprobs) joins the loss.
std::vector<Tensor> ppo_policy_loss(const Tensor& logprobs, const Tensor& old_logprobs, const Tensor& advantages,
                                    const Tensor& response_mask, double clip_low, double clip_high, double dual_clip,
                                    int64_t agg, double denominator, const std::optional<Tensor>& ref_logprobs,
                                    double kl_loss_coef, int64_t kl_estimator,
                                    const std::optional<Tensor>& token_weights);
// -> [loss (), d loss / d values (B, T) float32, stats (1,): value clip fraction]
std::vector<Tensor> ppo_value_loss(const Tensor& values, const Tensor& old_values, const Tensor& returns,
                                   const Tensor& response_mask, double clip, int64_t agg, double denominator);

}  // namespace fastppo
