// The critic-free estimators' per-sequence advantages from the scores of consecutive groups of responses; twin of
// group_advantages in fastppo/ops/reference.py. With mean and unbiased std over a group of G:
//   grpo (r - mean) / (std + eps) (0 for G = 1),   dr_grpo r - mean,   rloo G / (G - 1) (r - mean)
// (rloo's r - (sum - r) / (G - 1), without the cancellation of sum - r). A group per task step, in double.

#include "common.h"

namespace fastppo {

enum GroupEstimator : int64_t { kGrpo = 0, kDrGrpo = 1, kRloo = 2 };

Tensor group_advantages(const Tensor& scores_in, int64_t group_size, int64_t estimator, double eps) {
  check_float(scores_in, "scores");
  TORCH_CHECK(scores_in.dim() == 1, "scores must be (B,), got ", scores_in.sizes());
  TORCH_CHECK(group_size >= 1 && scores_in.size(0) % group_size == 0, "scores (", scores_in.size(0),
              " rows) must hold whole groups of group_size=", group_size);
  TORCH_CHECK(estimator != kRloo || group_size >= 2, "rloo needs group_size >= 2");
  const Tensor scores = scores_in.to(at::kDouble).contiguous();
  const int64_t B = scores.size(0), G = group_size;
  Tensor out = at::empty({B}, scores_in.options().dtype(at::kFloat));
  const double* r = scores.data_ptr<double>();
  float* a = out.data_ptr<float>();
  at::parallel_for(0, B / G, row_grain(G), [&](int64_t begin, int64_t end) {
    for (int64_t group = begin; group < end; ++group) {
      const double* x = r + group * G;
      double mean = 0, m2 = 0;
      for (int64_t i = 0; i < G; ++i) mean += x[i];
      mean /= G;
      for (int64_t i = 0; i < G; ++i) m2 += (x[i] - mean) * (x[i] - mean);
      const double scale = estimator == kDrGrpo ? 1.0
                           : estimator == kRloo ? static_cast<double>(G) / (G - 1)
                           : G == 1             ? 0.0  // no std for a group of one: advantage 0
                                                : 1.0 / (std::sqrt(m2 / (G - 1)) + eps);
      for (int64_t i = 0; i < G; ++i) a[group * G + i] = static_cast<float>((x[i] - mean) * scale);
    }
  });
  return out;
}

}  // namespace fastppo
