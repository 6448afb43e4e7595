// GAE as a reverse scan over time, a sequence per task, and VAPO's length-adaptive lambda; twins of gae /
// length_adaptive_lam in fastppo/ops/reference.py.
//
//   delta_t = r_t + gamma V_{t+1} - V_t,   A_t = delta_t + gamma lam_b A_{t+1},   R_t = A_t + V_t
// with V and A taken as 0 past a sequence's last valid token (right padding): nothing is bootstrapped there. lam_b
// is one lambda for the batch or one per row; decoupled GAE runs a second accumulator with critic_lam in the same
// pass (the same delta_t) and takes the returns from it.

#include "common.h"

namespace fastppo {

std::vector<Tensor> gae(const Tensor& rewards_in, const Tensor& values_in, const Tensor& mask_in, double gamma,
                        const std::optional<Tensor>& lam_per_row, double lam, double critic_lam) {
  check_bt(rewards_in, mask_in, "rewards");
  check_bt(values_in, mask_in, "values");
  const Tensor rw = as_f32(rewards_in), v = as_f32(values_in);
  const Tensor mask = as_f32(mask_in);
  const int64_t B = rw.size(0), T = rw.size(1);
  Tensor lams;
  if (lam_per_row) {
    check_float(*lam_per_row, "lam");
    TORCH_CHECK(lam_per_row->dim() == 1 && lam_per_row->size(0) == B, "lam must be (B=", B, "), got ",
                lam_per_row->sizes());
    lams = as_f32(*lam_per_row);
  }
  const float* row_lam = lam_per_row ? lams.data_ptr<float>() : nullptr;
  Tensor advantages = at::empty({B, T}, rw.options()), returns = at::empty({B, T}, rw.options());
  const float *r = rw.data_ptr<float>(), *val = v.data_ptr<float>(), *m = mask.data_ptr<float>();
  float *adv = advantages.data_ptr<float>(), *ret = returns.data_ptr<float>();
  const float g = static_cast<float>(gamma);
  const bool decoupled = critic_lam >= 0;
  const float gcl = static_cast<float>(gamma * std::max(critic_lam, 0.0));
  at::parallel_for(0, B, row_grain(T), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const float gl = g * (row_lam ? row_lam[row] : static_cast<float>(lam));
      // 0 past the end and at padding: nothing is bootstrapped there
      float next_value = 0, next_advantage = 0, next_critic_advantage = 0;
      for (int64_t t = T - 1; t >= 0; --t) {
        const int64_t i = row * T + t;
        if (m[i] == 0) {
          adv[i] = ret[i] = next_value = next_advantage = next_critic_advantage = 0;
          continue;
        }
        const float delta = r[i] + g * next_value - val[i];
        next_advantage = delta + gl * next_advantage;
        next_critic_advantage = decoupled ? delta + gcl * next_critic_advantage : next_advantage;
        next_value = val[i];
        adv[i] = next_advantage;
        ret[i] = next_critic_advantage + val[i];
      }
    }
  });
  return {advantages, returns};
}

Tensor length_adaptive_lam(const Tensor& mask_in, double alpha) {
  check_cpu(mask_in, "response_mask");
  TORCH_CHECK(mask_in.dim() == 2, "response_mask must be (B, T), got ", mask_in.sizes());
  const Tensor mask = as_f32(mask_in);
  const int64_t B = mask.size(0), T = mask.size(1);
  Tensor lam = at::empty({B}, mask.options());
  const float* m = mask.data_ptr<float>();
  float* out = lam.data_ptr<float>();
  at::parallel_for(0, B, row_grain(T), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      float length = 0;  // exact in float up to 2^24 tokens a row
#pragma omp simd reduction(+ : length)
      for (int64_t t = 0; t < T; ++t) length += m[row * T + t] != 0 ? 1.0f : 0.0f;
      // Length 0: 1 - inf, clamped to 0.
      out[row] = static_cast<float>(std::min(std::max(1.0 - 1.0 / (alpha * length), 0.0), 1.0));
    }
  });
  return lam;
}

}  // namespace fastppo
