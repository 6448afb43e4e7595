// GAE as a reverse scan over time, a sequence per task, and masked whitening; twins of gae / masked_whiten in
// fastppo/ops/reference.py.
//
//   delta_t = r_t + gamma V_{t+1} - V_t,   A_t = delta_t + gamma lam A_{t+1},   R_t = A_t + V_t
// with V and A taken as 0 past a sequence's last valid token (right padding): nothing is bootstrapped there.

#include "common.h"

namespace fastppo {

std::vector<Tensor> gae(const Tensor& rewards_in, const Tensor& values_in, const Tensor& mask_in, double gamma,
                        double lam) {
  check_bt(rewards_in, mask_in, "rewards");
  check_bt(values_in, mask_in, "values");
  const Tensor rw = as_f32(rewards_in), v = as_f32(values_in);
  const Tensor mask = as_f32(mask_in);
  const int64_t B = rw.size(0), T = rw.size(1);
  Tensor advantages = at::empty({B, T}, rw.options()), returns = at::empty({B, T}, rw.options());
  const float *r = rw.data_ptr<float>(), *val = v.data_ptr<float>(), *m = mask.data_ptr<float>();
  float *adv = advantages.data_ptr<float>(), *ret = returns.data_ptr<float>();
  const float g = static_cast<float>(gamma), gl = static_cast<float>(gamma * lam);
  at::parallel_for(0, B, row_grain(T), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      float next_value = 0, next_advantage = 0;  // 0 past the end and at padding: nothing is bootstrapped there
      for (int64_t t = T - 1; t >= 0; --t) {
        const int64_t i = row * T + t;
        if (m[i] == 0) {
          adv[i] = ret[i] = next_value = next_advantage = 0;
          continue;
        }
        const float delta = r[i] + g * next_value - val[i];
        next_advantage = delta + gl * next_advantage;
        next_value = val[i];
        adv[i] = next_advantage;
        ret[i] = next_advantage + val[i];
      }
    }
  });
  return {advantages, returns};
}

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
