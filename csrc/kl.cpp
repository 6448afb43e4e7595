// Per-token KL estimators and reward shaping; twins of kl_penalty / shape_rewards in fastppo/ops/reference.py.
//
// With d = logp - ref_logp:  k1 = d,  k2 = d^2 / 2,  k3 = e^{-d} - 1 + d,  abs = |d|.
// shape_rewards writes reward_t = -kl_coef * kl_t at every valid token and adds the sequence's score at its last
// valid token, in one pass over each row.

#include "common.h"

namespace fastppo {

template <typename acc_t>
static inline acc_t kl_value(acc_t d, int64_t estimator) {
  switch (estimator) {
    case 0: return d;                           // k1
    case 1: return acc_t(0.5) * d * d;          // k2
    case 2: return std::expm1(-d) + d;          // k3 (exact: this one also serves float64)
    default: return std::abs(d);                // abs
  }
}

template <typename acc_t>
static inline acc_t kl_derivative(acc_t d, int64_t estimator) {  // d kl / d d
  switch (estimator) {
    case 0: return acc_t(1);
    case 1: return d;
    case 2: return -std::expm1(-d);
    default: return d > 0 ? acc_t(1) : (d < 0 ? acc_t(-1) : acc_t(0));
  }
}

Tensor kl_penalty_forward(const Tensor& logprobs_in, const Tensor& ref_in, int64_t estimator) {
  const bool f64 = logprobs_in.scalar_type() == at::kDouble || ref_in.scalar_type() == at::kDouble;
  const auto dtype = f64 ? at::kDouble : at::kFloat;
  const Tensor lp = logprobs_in.to(dtype).contiguous(), ref = ref_in.to(dtype).contiguous();
  Tensor out = at::empty_like(lp);
  AT_DISPATCH_FLOATING_TYPES(dtype, "kl_penalty_forward", [&] {
    const scalar_t *a = lp.data_ptr<scalar_t>(), *b = ref.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, lp.numel(), at::internal::GRAIN_SIZE, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) o[i] = kl_value<scalar_t>(a[i] - b[i], estimator);
    });
  });
  return out;
}

// Gradient wrt logprobs (wrt ref_logprobs it is the negative), times grad_output.
Tensor kl_penalty_backward(const Tensor& logprobs_in, const Tensor& ref_in, const Tensor& grad_in, int64_t estimator) {
  const Tensor lp = logprobs_in.to(grad_in.scalar_type()).contiguous();
  const Tensor ref = ref_in.to(grad_in.scalar_type()).contiguous(), g = grad_in.contiguous();
  Tensor out = at::empty_like(g);
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "kl_penalty_backward", [&] {
    const scalar_t *a = lp.data_ptr<scalar_t>(), *b = ref.data_ptr<scalar_t>(), *gg = g.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, g.numel(), at::internal::GRAIN_SIZE, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) o[i] = gg[i] * kl_derivative<scalar_t>(a[i] - b[i], estimator);
    });
  });
  return out;
}

// One sequence: kl_t (0 at padding) and reward_t = -kl_coef kl_t. The estimator is a loop constant, so each case is
// its own vectorized loop. Returns the index of the last valid token, or -1.
FASTPPO_SIMD static int64_t shape_row(const float* a, const float* b, const float* m, int64_t T, float kl_coef,
                                      int64_t estimator, float* kl, float* rewards) {
  for (int64_t t = 0; t < T; ++t) kl[t] = m[t] != 0 ? a[t] - b[t] : 0.0f;  // d, selected: garbage stays out
  switch (estimator) {
    case 0: break;
    case 1:
      for (int64_t t = 0; t < T; ++t) kl[t] = 0.5f * kl[t] * kl[t];
      break;
    case 2:
      for (int64_t t = 0; t < T; ++t) kl[t] = exp_neg_minus_one_plus(kl[t]);
      break;
    default:
      for (int64_t t = 0; t < T; ++t) kl[t] = std::abs(kl[t]);
  }
  for (int64_t t = 0; t < T; ++t) rewards[t] = -kl_coef * kl[t];
  int64_t last = T - 1;
  while (last >= 0 && m[last] == 0) --last;
  return last;
}

std::vector<Tensor> shape_rewards(const Tensor& scores_in, const Tensor& logprobs_in, const Tensor& ref_in,
                                  const Tensor& mask_in, double kl_coef, int64_t estimator) {
  check_bt(logprobs_in, mask_in, "logprobs");
  check_bt(ref_in, mask_in, "ref_logprobs");
  const Tensor lp = as_f32(logprobs_in), ref = as_f32(ref_in), scores = as_f32(scores_in), mask = as_f32(mask_in);
  const int64_t B = lp.size(0), T = lp.size(1);
  TORCH_CHECK(scores.numel() == B, "scores must be (B=", B, ",), got ", scores_in.sizes());
  Tensor rewards = at::empty({B, T}, lp.options()), kl = at::empty({B, T}, lp.options());
  const float *a = lp.const_data_ptr<float>(), *b = ref.const_data_ptr<float>(), *m = mask.const_data_ptr<float>();
  const float* score = scores.const_data_ptr<float>();
  float *r = rewards.data_ptr<float>(), *k = kl.data_ptr<float>();
  at::parallel_for(0, B, row_grain(T), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t i = row * T;
      const int64_t last = shape_row(a + i, b + i, m + i, T, static_cast<float>(kl_coef), estimator, k + i, r + i);
      if (last >= 0) r[i + last] += score[row];
    }
  });
  return {rewards, kl};
}

}  // namespace fastppo
