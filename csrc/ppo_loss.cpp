// The clipped PPO policy and value losses: loss, per-token gradient and stats in one pass over (B, T); twins of
// ppo_policy_loss / ppo_value_loss in fastppo/ops/reference.py. The aggregated loss is sum_t w_t loss_t with
// w = mask * row_scale (token-mean: 1/n_tokens; seq-mean-token-mean: 1/(len_b n_seqs); seq-mean-token-sum: 1/n_seqs),
// so the backward is the saved per-token gradient times the upstream scalar. The policy loss optionally carries the
// KL-in-loss term kl_loss_coef * kl(logprobs - ref_logprobs) of GRPO / veRL / OpenRLHF in the same pass.

#include "common.h"

namespace fastppo {

enum Agg : int64_t { kTokenMean = 0, kSeqMeanTokenMean = 1, kSeqMeanTokenSum = 2 };

// The twin of loss_row_scales in fastppo/ops/reference.py (the rule), computed here in the kernel's own pass over
// the mask: taking it from Python would add a few small torch ops per call, several % of the kernel at (64, 512).
static std::vector<double> row_scales(const float* m, int64_t B, int64_t T, int64_t agg, double denominator) {
  std::vector<double> lengths(B, 0.0), scales(B);
  double total = 0, n_seqs = 0;
  for (int64_t b = 0; b < B; ++b) {
    float length = 0;  // exact in float for 0/1 masks up to 2^24 tokens a row
#pragma omp simd reduction(+ : length)
    for (int64_t t = 0; t < T; ++t) length += m[b * T + t];
    lengths[b] = length;
    total += lengths[b];
    n_seqs += lengths[b] > 0;
  }
  const bool override = denominator > 0;
  for (int64_t b = 0; b < B; ++b) {
    if (agg == kTokenMean) {
      scales[b] = 1.0 / std::max(override ? denominator : total, 1.0);
    } else {
      const double seqs = std::max(override ? denominator : n_seqs, 1.0);
      scales[b] = agg == kSeqMeanTokenMean ? 1.0 / (std::max(lengths[b], 1.0) * seqs) : 1.0 / seqs;
    }
  }
  return scales;
}

// kl(d) and d kl / d d of the estimator (0 k1, 1 k2, 2 k3, 3 abs), selected without a branch so that the loop
// around it still vectorizes. k3's derivative 1 - e^{-d} is d - k3: accurate near d = 0, where 1 - e^{-d} cancels.
static inline void kl_and_derivative(float d, int64_t estimator, float& kl, float& derivative) {
  const float k3 = exp_neg_minus_one_plus(d);
  const float sign = d > 0 ? 1.0f : (d < 0 ? -1.0f : 0.0f);
  kl = estimator == 0 ? d : (estimator == 1 ? 0.5f * d * d : (estimator == 2 ? k3 : std::abs(d)));
  derivative = estimator == 0 ? 1.0f : (estimator == 1 ? d : (estimator == 2 ? d - k3 : sign));
}

// One sequence of the policy loss. Branch-free so the loop vectorizes: every load is unconditional and every
// condition is a select between floats (bool logic inside the loop keeps GCC from vectorizing it). Padded positions
// are selected to neutral values, never multiplied, so garbage there cannot leak. `r` is the reference's log-probs
// (with_kl) or any readable row (then unused); `tw` the per-token weights of the policy-gradient term (token_weights;
// all 1 when none were given; the KL term is not weighted). out: loss, n_valid, clipped, dual clipped, approx kl,
// ratio sum, ratio max, ref kl.
FASTPPO_SIMD static void policy_row(const float* l, const float* o, const float* a, const float* r, const float* m,
                                    const float* tw, float* g, int64_t T, float scale, float low, float high,
                                    float dual_clip, bool with_kl, float kl_coef, int64_t estimator, double* out) {
  const float c = dual_clip > 0 ? dual_clip : std::numeric_limits<float>::infinity();  // dual clip off: no cap
  // float accumulators within a row (the caller sums rows in double): double reductions keep the loop scalar.
  float loss = 0, n = 0, clipped_count = 0, dual_count = 0, kl = 0, ratio_sum = 0, ratio_max = 0, ref_kl = 0;
#pragma omp simd reduction(+ : loss, n, clipped_count, dual_count, kl, ratio_sum, ref_kl) reduction(max : ratio_max)
  for (int64_t t = 0; t < T; ++t) {
    const float mt = m[t], lt = l[t], ot = o[t], at = a[t], rt = r[t];
    const float valid = mt != 0 ? 1.0f : 0.0f;
    const float log_ratio = mt != 0 ? lt - ot : 0.0f, A = mt != 0 ? at : 0.0f;
    const float ratio = fast_exp(log_ratio);
    const float unclipped = -A * ratio;
    const float clipped = -A * std::min(std::max(ratio, low), high);
    const float inside = (ratio >= low ? 1.0f : 0.0f) * (ratio <= high ? 1.0f : 0.0f);
    // d per_token / d log_ratio = unclipped * branch; at a tie torch.maximum splits the gradient in two.
    const float branch = clipped > unclipped ? inside : (unclipped > clipped ? 1.0f : 0.5f * (1.0f + inside));
    const float cap = A < 0 ? -c * A : std::numeric_limits<float>::infinity();  // dual clip: loss <= -c A for A < 0
    const float surrogate = std::max(clipped, unclipped);
    float token_kl = 0, kl_derivative = 0;
    if (with_kl) kl_and_derivative(mt != 0 ? lt - rt : 0.0f, estimator, token_kl, kl_derivative);
    const float w = mt != 0 ? mt * scale : 0.0f, w_pg = mt != 0 ? mt * scale * tw[t] : 0.0f;
    g[t] = w_pg * (surrogate > cap ? 0.0f : unclipped * branch) + w * kl_coef * kl_derivative;
    loss += w_pg * std::min(surrogate, cap) + w * kl_coef * token_kl;
    n += valid;
    clipped_count += clipped > unclipped ? valid : 0.0f;
    dual_count += surrogate > cap ? valid : 0.0f;
    kl += exp_neg_minus_one_plus(-log_ratio);  // k3 = (r - 1) - log r; 0 at padding: log_ratio was selected to 0
    ratio_sum += valid * ratio;
    ratio_max = std::max(ratio_max, mt != 0 ? ratio : 0.0f);
    ref_kl += token_kl;  // 0 at padding: its log-ratio was selected to 0, and every estimator is 0 there
  }
  out[0] = loss, out[1] = n, out[2] = clipped_count, out[3] = dual_count, out[4] = kl, out[5] = ratio_sum;
  out[6] = ratio_max, out[7] = ref_kl;
}

// One sequence of the value loss, branch-free like policy_row. No clipping is an infinite clip range: every value
// is then inside it, the clipped and unclipped errors coincide, and the loss is the plain squared error.
// out: loss, n_valid, clipped.
FASTPPO_SIMD static void value_row(const float* v, const float* o, const float* r, const float* m, float* g,
                                   int64_t T, float scale, bool use_clip, float clip, double* out) {
  const float bound = use_clip ? clip : std::numeric_limits<float>::infinity();
  float loss = 0, n = 0, clipped_count = 0;  // float: see policy_row
#pragma omp simd reduction(+ : loss, n, clipped_count)
  for (int64_t t = 0; t < T; ++t) {
    const float mt = m[t], vt = v[t], ot = o[t], rt = r[t];
    const float valid = mt != 0 ? 1.0f : 0.0f;
    const float value = mt != 0 ? vt : 0.0f, old = mt != 0 ? ot : 0.0f, ret = mt != 0 ? rt : 0.0f;
    const float error = value - ret;
    const float unclipped = error * error;
    const float step = value - old;
    const float inside = (step >= -bound ? 1.0f : 0.0f) * (step <= bound ? 1.0f : 0.0f);
    // Inside the clip range the clipped value is V itself (old + (V - old) may round to a neighbour of V). Two
    // statements, not one nested expression: GCC 12 vectorizes only this form.
    const float outside_error = old + std::min(std::max(step, -bound), bound) - ret;
    const float clipped_error = inside > 0 ? error : outside_error;
    const float clipped = clipped_error * clipped_error;
    const float s = clipped > unclipped ? 1.0f : (unclipped > clipped ? 0.0f : 0.5f);  // share of the clipped term
    const float w = mt != 0 ? mt * scale : 0.0f;
    g[t] = w * ((1.0f - s) * error + inside * s * clipped_error);
    loss += w * 0.5f * std::max(clipped, unclipped);
    n += valid;
    clipped_count += clipped > unclipped ? valid : 0.0f;
  }
  out[0] = loss, out[1] = n, out[2] = clipped_count;
}

// Returns loss (0-dim), grad (B, T) float32 (d loss / d logprobs), stats [clip, dual clip, approx kl, ratio mean,
// ratio max, ref kl] float32.
std::vector<Tensor> ppo_policy_loss(const Tensor& logprobs_in, const Tensor& old_in, const Tensor& adv_in,
                                    const Tensor& mask_in, double clip_low, double clip_high, double dual_clip,
                                    int64_t agg, double denominator, const std::optional<Tensor>& ref_in,
                                    double kl_loss_coef, int64_t kl_estimator,
                                    const std::optional<Tensor>& token_weights) {
  check_bt(logprobs_in, mask_in, "logprobs");
  check_bt(old_in, mask_in, "old_logprobs");
  check_bt(adv_in, mask_in, "advantages");
  if (ref_in) check_bt(*ref_in, mask_in, "ref_logprobs");
  if (token_weights.has_value()) check_bt(*token_weights, mask_in, "token_weights");
  TORCH_CHECK(kl_estimator >= 0 && kl_estimator <= 3, "kl_estimator must be 0 (k1), 1 (k2), 2 (k3) or 3 (abs)");
  const Tensor lp = as_f32(logprobs_in), old = as_f32(old_in);
  const Tensor adv = as_f32(adv_in), mask = as_f32(mask_in);
  const Tensor ref = ref_in ? as_f32(*ref_in) : lp;  // without a reference, any readable (B, T) floats: unused
  const int64_t B = lp.size(0), T = lp.size(1);
  // Ones when absent: one unconditional load keeps policy_row branch-free (and vectorized) for both cases.
  const Tensor weights = token_weights.has_value() ? as_f32(*token_weights) : at::ones({B, T}, lp.options());
  const float *l = lp.data_ptr<float>(), *o = old.data_ptr<float>(), *a = adv.data_ptr<float>();
  const float *rf = ref.data_ptr<float>(), *m = mask.data_ptr<float>(), *tw = weights.data_ptr<float>();
  const std::vector<double> scale = row_scales(m, B, T, agg, denominator);
  Tensor grad = at::empty({B, T}, lp.options());
  float* g = grad.data_ptr<float>();
  const float low = static_cast<float>(1.0 - clip_low), high = static_cast<float>(1.0 + clip_high);
  const bool with_kl = ref_in.has_value();
  const float kl_coef = with_kl ? static_cast<float>(kl_loss_coef) : 0.0f;
  // per-row partials: loss, n_valid, clipped, dual clipped, approx kl, ratio sum, ratio max, ref kl
  constexpr int kPartials = 8;
  std::vector<double> partials(B * kPartials, 0.0);
  at::parallel_for(0, B, row_grain(T), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t i = b * T;
      policy_row(l + i, o + i, a + i, rf + i, m + i, tw + i, g + i, T, static_cast<float>(scale[b]), low, high,
                 static_cast<float>(dual_clip), with_kl, kl_coef, kl_estimator, &partials[b * kPartials]);
    }
  });
  double sums[kPartials] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int64_t b = 0; b < B; ++b) {
    for (int k = 0; k < kPartials; ++k) sums[k] += k == 6 ? 0.0 : partials[b * kPartials + k];
    sums[6] = std::max(sums[6], partials[b * kPartials + 6]);
  }
  const double n = std::max(sums[1], 1.0);
  Tensor stats = at::tensor({static_cast<float>(sums[2] / n), static_cast<float>(sums[3] / n),
                             static_cast<float>(sums[4] / n), static_cast<float>(sums[5] / n),
                             static_cast<float>(sums[6]), static_cast<float>(sums[7] / n)});
  return {at::scalar_tensor(sums[0], at::kFloat), grad, stats};
}

// Returns loss (0-dim), grad (B, T) float32 (d loss / d values), stats [value clip fraction].
std::vector<Tensor> ppo_value_loss(const Tensor& values_in, const Tensor& old_in, const Tensor& returns_in,
                                   const Tensor& mask_in, double clip, int64_t agg, double denominator) {
  check_bt(values_in, mask_in, "values");
  check_bt(old_in, mask_in, "old_values");
  check_bt(returns_in, mask_in, "returns");
  const Tensor v = as_f32(values_in), old = as_f32(old_in);
  const Tensor ret = as_f32(returns_in), mask = as_f32(mask_in);
  const int64_t B = v.size(0), T = v.size(1);
  const float *vv = v.data_ptr<float>(), *o = old.data_ptr<float>(), *r = ret.data_ptr<float>();
  const float* m = mask.data_ptr<float>();
  const std::vector<double> scale = row_scales(m, B, T, agg, denominator);
  Tensor grad = at::empty({B, T}, v.options());
  float* g = grad.data_ptr<float>();
  const bool use_clip = clip >= 0;
  const float bound = static_cast<float>(clip);
  std::vector<double> partials(B * 3, 0.0);  // loss, n_valid, clipped
  at::parallel_for(0, B, row_grain(T), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t i = b * T;
      value_row(vv + i, o + i, r + i, m + i, g + i, T, static_cast<float>(scale[b]), use_clip, bound,
                &partials[b * 3]);
    }
  });
  double loss = 0, n = 0, clipped = 0;
  for (int64_t b = 0; b < B; ++b) loss += partials[b * 3], n += partials[b * 3 + 1], clipped += partials[b * 3 + 2];
  return {at::scalar_tensor(loss, at::kFloat), grad,
          at::tensor({static_cast<float>(clipped / std::max(n, 1.0))})};
}

}  // namespace fastppo
