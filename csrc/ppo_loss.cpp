// The clipped PPO policy and value losses: loss, per-token gradient and stats in one pass over (B, T); twins of
// ppo_policy_loss / ppo_value_loss in fastppo/ops/reference.py. The aggregated loss is sum_t w_t loss_t with
// w = mask * row_scale (token-mean: 1/n_tokens; seq-mean-token-mean: 1/(len_b n_seqs); seq-mean-token-sum: 1/n_seqs),
// so the backward is the saved per-token gradient times the upstream scalar.

#include "common.h"

namespace fastppo {

enum Agg : int64_t { kTokenMean = 0, kSeqMeanTokenMean = 1, kSeqMeanTokenSum = 2 };

static std::vector<double> row_scales(const float* m, int64_t B, int64_t T, int64_t agg, double denominator) {
  std::vector<double> lengths(B, 0.0), scales(B);
  double total = 0, n_seqs = 0;
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t t = 0; t < T; ++t) lengths[b] += m[b * T + t];
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

// Returns loss (0-dim), grad (B, T) float32 (d loss / d logprobs), stats [clip, dual clip, approx kl, ratio mean,
// ratio max] float32.
std::vector<Tensor> ppo_policy_loss(const Tensor& logprobs_in, const Tensor& old_in, const Tensor& adv_in,
                                    const Tensor& mask_in, double clip_low, double clip_high, double dual_clip,
                                    int64_t agg, double denominator) {
  check_bt(logprobs_in, mask_in, "logprobs");
  check_bt(old_in, mask_in, "old_logprobs");
  check_bt(adv_in, mask_in, "advantages");
  const Tensor lp = logprobs_in.to(at::kFloat).contiguous(), old = old_in.to(at::kFloat).contiguous();
  const Tensor adv = adv_in.to(at::kFloat).contiguous(), mask = float_mask(mask_in);
  const int64_t B = lp.size(0), T = lp.size(1);
  const float *l = lp.data_ptr<float>(), *o = old.data_ptr<float>(), *a = adv.data_ptr<float>();
  const float* m = mask.data_ptr<float>();
  const std::vector<double> scale = row_scales(m, B, T, agg, denominator);
  Tensor grad = at::empty({B, T}, lp.options());
  float* g = grad.data_ptr<float>();
  const float low = static_cast<float>(1.0 - clip_low), high = static_cast<float>(1.0 + clip_high);
  const bool use_dual = dual_clip > 0;
  // per-row partials: loss, n_valid, clipped, dual clipped, approx kl, ratio sum, ratio max
  std::vector<double> partials(B * 7, 0.0);
  at::parallel_for(0, B, row_grain(T), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      double* p = &partials[b * 7];
      for (int64_t t = 0; t < T; ++t) {
        const int64_t i = b * T + t;
        if (m[i] == 0) {
          g[i] = 0;
          continue;
        }
        const float log_ratio = l[i] - o[i], A = a[i];
        const float ratio = std::exp(log_ratio);
        const float unclipped = -A * ratio;
        const float clipped = -A * std::min(std::max(ratio, low), high);
        const bool inside = ratio >= low && ratio <= high;
        float per_token, branch;
        if (clipped > unclipped) {
          per_token = clipped, branch = inside ? 1.0f : 0.0f;
        } else if (unclipped > clipped) {
          per_token = unclipped, branch = 1.0f;
        } else {  // a tie: torch.maximum splits the gradient between the two branches
          per_token = unclipped, branch = 0.5f * (1.0f + (inside ? 1.0f : 0.0f));
        }
        float d = unclipped * branch;
        if (use_dual && A < 0 && per_token > static_cast<float>(-dual_clip) * A) {
          per_token = static_cast<float>(-dual_clip) * A, d = 0;
          p[3] += 1;
        }
        const double w = m[i] * scale[b];
        p[0] += w * per_token;
        g[i] = static_cast<float>(w * d);
        p[1] += 1;
        p[2] += clipped > unclipped;
        p[4] += std::expm1(-static_cast<double>(log_ratio)) + log_ratio;
        p[5] += ratio;
        p[6] = std::max(p[6], static_cast<double>(ratio));
      }
    }
  });
  double sums[7] = {0, 0, 0, 0, 0, 0, 0};
  for (int64_t b = 0; b < B; ++b) {
    for (int k = 0; k < 6; ++k) sums[k] += partials[b * 7 + k];
    sums[6] = std::max(sums[6], partials[b * 7 + 6]);
  }
  const double n = std::max(sums[1], 1.0);
  Tensor stats = at::tensor({static_cast<float>(sums[2] / n), static_cast<float>(sums[3] / n),
                                static_cast<float>(sums[4] / n), static_cast<float>(sums[5] / n),
                                static_cast<float>(sums[6])});
  return {at::scalar_tensor(sums[0], at::kFloat), grad, stats};
}

// Returns loss (0-dim), grad (B, T) float32 (d loss / d values), stats [value clip fraction].
std::vector<Tensor> ppo_value_loss(const Tensor& values_in, const Tensor& old_in, const Tensor& returns_in,
                                   const Tensor& mask_in, double clip, int64_t agg, double denominator) {
  check_bt(values_in, mask_in, "values");
  check_bt(old_in, mask_in, "old_values");
  check_bt(returns_in, mask_in, "returns");
  const Tensor v = values_in.to(at::kFloat).contiguous(), old = old_in.to(at::kFloat).contiguous();
  const Tensor ret = returns_in.to(at::kFloat).contiguous(), mask = float_mask(mask_in);
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
      double* p = &partials[b * 3];
      for (int64_t t = 0; t < T; ++t) {
        const int64_t i = b * T + t;
        if (m[i] == 0) {
          g[i] = 0;
          continue;
        }
        const float error = vv[i] - r[i];
        const float unclipped = error * error;
        float per_token = 0.5f * unclipped, d = error;
        if (use_clip) {
          const float step = vv[i] - o[i];
          const bool inside = step >= -bound && step <= bound;
          // Inside the clip range the clipped value is V itself (old + (V - old) may round to a neighbour of V).
          const float v_clipped = inside ? vv[i] : o[i] + std::min(std::max(step, -bound), bound);
          const float clipped_error = v_clipped - r[i];
          const float clipped = clipped_error * clipped_error;
          const float s_clipped = clipped > unclipped ? 1.0f : (unclipped > clipped ? 0.0f : 0.5f);
          per_token = 0.5f * std::max(clipped, unclipped);
          d = (1.0f - s_clipped) * error + (inside ? s_clipped * clipped_error : 0.0f);
          p[2] += clipped > unclipped;
        }
        const double w = m[i] * scale[b];
        p[0] += w * per_token;
        p[1] += 1;
        g[i] = static_cast<float>(w * d);
      }
    }
  });
  double loss = 0, n = 0, clipped = 0;
  for (int64_t b = 0; b < B; ++b) loss += partials[b * 3], n += partials[b * 3 + 1], clipped += partials[b * 3 + 2];
  return {at::scalar_tensor(loss, at::kFloat), grad,
          at::tensor({static_cast<float>(clipped / std::max(n, 1.0))})};
}

}  // namespace fastppo
