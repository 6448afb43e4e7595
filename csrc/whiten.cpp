// Masked whitening, the twin of masked_whiten in fastppo/ops/reference.py:
//
//   mean = sum_i x_i / n,   var = sum_i (x_i - mean)^2 / (n - 1)   (n when n < 2),   i over the n masked positions
//   out = (x - mean) / sqrt(var + eps)  (+ mean without shift_mean),   0 at padding
//
// A global reduction in double, two passes (the mean, then the squares about it: never sum(x^2) - n mean^2, which
// cancels when |mean| >> std). Output float32, float64 for float64 x. No gradient: advantages are whitened detached.

#include "common.h"

namespace fastppo {

Tensor masked_whiten(const Tensor& x_in, const Tensor& mask_in, bool shift_mean, double eps) {
  TORCH_CHECK(x_in.sizes() == mask_in.sizes(), "x and mask must have the same shape");
  const auto out_dtype = x_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const Tensor x = x_in.to(at::kDouble).contiguous(), mask = mask_in.to(at::kBool).contiguous();
  const double* xv = x.data_ptr<double>();
  const bool* mv = mask.data_ptr<bool>();
  const int64_t n = x.numel();
  double count = 0, sum = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (mv[i]) count += 1, sum += xv[i];
  }
  const double mean = count > 0 ? sum / count : 0.0;
  double sq = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (mv[i]) sq += (xv[i] - mean) * (xv[i] - mean);
  }
  const double scale = 1.0 / std::sqrt(sq / std::max(count - 1, 1.0) + eps);
  Tensor out = at::empty(x.sizes(), x.options());
  double* o = out.data_ptr<double>();
  for (int64_t i = 0; i < n; ++i) o[i] = mv[i] ? (xv[i] - mean) * scale + (shift_mean ? 0.0 : mean) : 0.0;
  return out.to(out_dtype);
}

}  // namespace fastppo
