// fastppo's native CPU kernels, registered as torch.ops.fastppo.* (see fastppo/ops/native.py for the autograd side).
//
// Each kernel is the C++ twin of a function in fastppo/ops/reference.py (the specification) and of a Triton kernel
// in kernels/. Rows (sequences, or token positions for the log-prob kernels) run in parallel with at::parallel_for;
// inner loops are plain arithmetic the compiler vectorizes. Inputs may be fp32, bf16, fp16 (or fp64); math is done in
// at::opmath_type (fp32 for the 16-bit types). Padded positions are selected away, never multiplied by the mask, so
// nan or inf garbage there cannot leak into an output.

#include <torch/extension.h>

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>
#include <cstring>
#include <cmath>
#include <limits>
#include <vector>

namespace fastppo {

using at::Tensor;

// ---------------------------------------------------------------------------------------------------------------
// exp that vectorizes: 2^(x log2 e) with a degree-6 polynomial for 2^f on [-1/2, 1/2] and the exponent written
// into the float's bits. Relative error < 2e-7 (about 2 ulp); exactly 0 below -87 (so p log p = 0 at a -inf logit),
// inf above 88. std::exp in a loop does not vectorize without -ffast-math, which would also break inf/nan handling.
// ---------------------------------------------------------------------------------------------------------------
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

// The hot loops are compiled for AVX-512, AVX2 and baseline x86-64, and the CPU picks its best at load time, so the
// wheel needs no -march flag. Each works on float32 blocks; 16-bit inputs are converted block by block.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FASTPPO_SIMD __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FASTPPO_SIMD
#endif

// Elements of a row handled per block: 2 KiB of fp32 stays in L1 between the block's max and its exp-sum, so the
// row is streamed from memory once (an online logsumexp over blocks rather than over single elements).
constexpr int64_t kBlock = 512;

// z = x / T for the block, and its max.
FASTPPO_SIMD static float scale_and_max(const float* x, int64_t n, float inv_t, float* z) {
  float block_max = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : block_max)
  for (int64_t j = 0; j < n; ++j) {
    z[j] = x[j] * inv_t;
    block_max = std::max(block_max, z[j]);
  }
  return block_max;
}

// s += sum e^{z - m}, a += sum e^{z - m} (z - m)
FASTPPO_SIMD static void exp_sums(const float* z, int64_t n, float m, float* s_out, float* a_out) {
  float s = 0, a = 0;
#pragma omp simd reduction(+ : s, a)
  for (int64_t j = 0; j < n; ++j) {
    const float d = z[j] - m;
    const float e = fast_exp(d);
    s += e;
    a += e > 0 ? e * d : 0.0f;  // e = 0 at a -inf logit, where d * e would be nan
  }
  *s_out += s;
  *a_out += a;
}

// out_j = -(g_logp p_j + g_H p_j (log p_j + H)), the gradient without the one-hot term (added by the caller).
FASTPPO_SIMD static void grad_block(const float* x, float* out, int64_t n, float inv_t, float lse, float h, float gl,
                                    float gh) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const float logp = x[j] * inv_t - lse;
    const float p = fast_exp(logp);
    out[j] = -gl * p - (p > 0 ? gh * p * (logp + h) : 0.0f);
  }
}

// A block of the row as float32: the row itself for fp32 input, else converted into `buffer`.
template <typename scalar_t>
static const float* as_float(const scalar_t* x, int64_t n, float* buffer) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return x;
  } else {
    for (int64_t j = 0; j < n; ++j) buffer[j] = static_cast<float>(x[j]);
    return buffer;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// token log-probs and entropy
//   logp = z_t - lse,  H = log s - a / s  with s = sum e^{z - m}, a = sum e^{z - m} (z - m), z = logits / T
// ---------------------------------------------------------------------------------------------------------------

template <typename scalar_t>
static void token_logprobs_rows(const scalar_t* logits, int64_t row_stride, const int64_t* tokens, int64_t N,
                                int64_t V, float inv_t, float* logprobs, float* entropy, float* lse_out) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> z(kBlock), buffer(kBlock);
    for (int64_t row = begin; row < end; ++row) {
      const scalar_t* x = logits + row * row_stride;
      float m = neg_inf, s = 0, a = 0;
      for (int64_t start = 0; start < V; start += kBlock) {
        const int64_t n = std::min(kBlock, V - start);
        const float block_max = scale_and_max(as_float(x + start, n, buffer.data()), n, inv_t, z.data());
        if (block_max == neg_inf) continue;  // only -inf here: adds nothing
        if (block_max > m) {                 // move the reference point of s and a to the new max
          if (s > 0) {
            const float alpha = std::exp(m - block_max);
            a = alpha * (a + (m - block_max) * s);
            s = alpha * s;
          }
          m = block_max;
        }
        exp_sums(z.data(), n, m, &s, &a);
      }
      const float lse = m + std::log(s);
      logprobs[row] = static_cast<float>(x[tokens[row]]) * inv_t - lse;
      entropy[row] = std::log(s) - a / s;
      lse_out[row] = lse;
    }
  });
}

static void check_rows(const Tensor& logits, const Tensor& tokens) {
  TORCH_CHECK(logits.device().is_cpu(), "fastppo native kernels take CPU tensors");
  TORCH_CHECK(logits.dim() == 2 && logits.stride(1) == 1, "logits must be (N, V) with unit stride along V");
  TORCH_CHECK(tokens.dim() == 1 && tokens.size(0) == logits.size(0), "tokens must be (N,) matching logits");
  TORCH_CHECK(tokens.scalar_type() == at::kLong, "tokens must be int64");
  const int64_t V = logits.size(1);
  TORCH_CHECK(tokens.numel() == 0 || (tokens.min().item<int64_t>() >= 0 && tokens.max().item<int64_t>() < V),
              "tokens must lie in [0, V)");
}

std::vector<Tensor> token_logprobs_forward(const Tensor& logits, const Tensor& tokens_in, double inv_temperature) {
  const Tensor tokens = tokens_in.contiguous();
  check_rows(logits, tokens);
  const int64_t N = logits.size(0), V = logits.size(1);
  auto options = logits.options().dtype(at::kFloat);
  Tensor logprobs = at::empty({N}, options), entropy = at::empty({N}, options), lse = at::empty({N}, options);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "token_logprobs_forward", [&] {
    TORCH_CHECK((!std::is_same_v<scalar_t, double>), "float64 logits go to the reference");
    if constexpr (!std::is_same_v<scalar_t, double>) {
      token_logprobs_rows<scalar_t>(logits.data_ptr<scalar_t>(), logits.stride(0), tokens.data_ptr<int64_t>(), N, V,
                                    static_cast<float>(inv_temperature), logprobs.data_ptr<float>(),
                                    entropy.data_ptr<float>(), lse.data_ptr<float>());
    }
  });
  return {logprobs, entropy, lse};
}

// dL/dz_j = [g_logp (onehot_j - p_j) - g_H p_j (log p_j + H)] / T, written in the logits' dtype.
Tensor token_logprobs_backward(const Tensor& logits, const Tensor& tokens_in, const Tensor& lse_in,
                               const Tensor& entropy_in, const Tensor& grad_logprobs_in,
                               const std::optional<Tensor>& grad_entropy_in, double inv_temperature) {
  const Tensor tokens = tokens_in.contiguous(), lse = lse_in.contiguous(), entropy = entropy_in.contiguous();
  const Tensor g_logp = grad_logprobs_in.to(at::kFloat).contiguous();
  const bool has_g_entropy = grad_entropy_in.has_value() && grad_entropy_in->defined();
  const Tensor g_entropy = has_g_entropy ? grad_entropy_in->to(at::kFloat).contiguous() : g_logp;
  check_rows(logits, tokens);
  const int64_t N = logits.size(0), V = logits.size(1);
  Tensor grad = at::empty({N, V}, logits.options());
  const float inv_t = static_cast<float>(inv_temperature);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "token_logprobs_backward", [&] {
    TORCH_CHECK((!std::is_same_v<scalar_t, double>), "float64 logits go to the reference");
    if constexpr (!std::is_same_v<scalar_t, double>) {
      const scalar_t* x = logits.data_ptr<scalar_t>();
      scalar_t* out = grad.data_ptr<scalar_t>();
      const int64_t stride = logits.stride(0);
      at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
        std::vector<float> buffer(kBlock), grad_buffer(kBlock);
        for (int64_t row = begin; row < end; ++row) {
          const scalar_t* xr = x + row * stride;
          scalar_t* gr = out + row * V;
          const float l = lse.data_ptr<float>()[row], h = entropy.data_ptr<float>()[row];
          const float gl = g_logp.data_ptr<float>()[row] * inv_t;
          const float gh = has_g_entropy ? g_entropy.data_ptr<float>()[row] * inv_t : 0.0f;
          for (int64_t start = 0; start < V; start += kBlock) {
            const int64_t n = std::min(kBlock, V - start);
            const float* xf = as_float(xr + start, n, buffer.data());
            if constexpr (std::is_same_v<scalar_t, float>) {
              grad_block(xf, reinterpret_cast<float*>(gr + start), n, inv_t, l, h, gl, gh);
            } else {
              grad_block(xf, grad_buffer.data(), n, inv_t, l, h, gl, gh);
              for (int64_t j = 0; j < n; ++j) gr[start + j] = static_cast<scalar_t>(grad_buffer[j]);
            }
          }
          const int64_t t = tokens.data_ptr<int64_t>()[row];
          const float logp_t = static_cast<float>(xr[t]) * inv_t - l;
          const float p_t = fast_exp(logp_t);
          gr[t] = static_cast<scalar_t>(gl * (1 - p_t) - (p_t > 0 ? gh * p_t * (logp_t + h) : 0.0f));
        }
      });
    }
  });
  return grad;
}

// ---------------------------------------------------------------------------------------------------------------
// (B, T) sequence ops: helpers
// ---------------------------------------------------------------------------------------------------------------

static Tensor as_float_mask(const Tensor& mask) { return mask.to(at::kFloat).contiguous(); }

static void check_bt(const Tensor& x, const Tensor& mask, const char* name) {
  TORCH_CHECK(x.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(x.dim() == 2 && x.sizes() == mask.sizes(), name, " must be (B, T) like response_mask");
}

// ---------------------------------------------------------------------------------------------------------------
// KL estimators and reward shaping
// ---------------------------------------------------------------------------------------------------------------

template <typename acc_t>
static inline acc_t kl_value(acc_t d, int64_t estimator) {
  switch (estimator) {
    case 0: return d;                           // k1
    case 1: return acc_t(0.5) * d * d;          // k2
    case 2: return std::expm1(-d) + d;          // k3
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
    at::parallel_for(0, lp.numel(), 4096, [&](int64_t begin, int64_t end) {
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
    at::parallel_for(0, g.numel(), 4096, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) o[i] = gg[i] * kl_derivative<scalar_t>(a[i] - b[i], estimator);
    });
  });
  return out;
}

std::vector<Tensor> shape_rewards(const Tensor& scores_in, const Tensor& logprobs_in, const Tensor& ref_in,
                                  const Tensor& mask_in, double kl_coef, int64_t estimator) {
  check_bt(logprobs_in, mask_in, "logprobs");
  check_bt(ref_in, mask_in, "ref_logprobs");
  const Tensor lp = logprobs_in.to(at::kFloat).contiguous(), ref = ref_in.to(at::kFloat).contiguous();
  const Tensor scores = scores_in.to(at::kFloat).contiguous(), mask = as_float_mask(mask_in);
  const int64_t B = lp.size(0), T = lp.size(1);
  Tensor rewards = at::empty({B, T}, lp.options()), kl = at::empty({B, T}, lp.options());
  const float *a = lp.data_ptr<float>(), *b = ref.data_ptr<float>(), *m = mask.data_ptr<float>();
  float *r = rewards.data_ptr<float>(), *k = kl.data_ptr<float>();
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      int64_t last = -1;
      for (int64_t t = 0; t < T; ++t) {
        const int64_t i = row * T + t;
        const bool valid = m[i] != 0;
        k[i] = valid ? kl_value<float>(a[i] - b[i], estimator) : 0.0f;
        r[i] = static_cast<float>(-kl_coef * k[i]);
        if (valid) last = t;
      }
      if (last >= 0) r[row * T + last] += scores.data_ptr<float>()[row];
    }
  });
  return {rewards, kl};
}

// ---------------------------------------------------------------------------------------------------------------
// GAE: the reverse scan over time, a sequence per task
// ---------------------------------------------------------------------------------------------------------------

std::vector<Tensor> gae(const Tensor& rewards_in, const Tensor& values_in, const Tensor& mask_in, double gamma,
                        double lam) {
  check_bt(rewards_in, mask_in, "rewards");
  check_bt(values_in, mask_in, "values");
  const Tensor rw = rewards_in.to(at::kFloat).contiguous(), v = values_in.to(at::kFloat).contiguous();
  const Tensor mask = as_float_mask(mask_in);
  const int64_t B = rw.size(0), T = rw.size(1);
  Tensor advantages = at::empty({B, T}, rw.options()), returns = at::empty({B, T}, rw.options());
  const float *r = rw.data_ptr<float>(), *val = v.data_ptr<float>(), *m = mask.data_ptr<float>();
  float *adv = advantages.data_ptr<float>(), *ret = returns.data_ptr<float>();
  const float g = static_cast<float>(gamma), gl = static_cast<float>(gamma * lam);
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
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

// ---------------------------------------------------------------------------------------------------------------
// masked whitening: mean and unbiased variance over the mask, in double, two passes (no cancellation)
// ---------------------------------------------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------------------------------------------
// PPO losses: forward, per-token gradient and stats in one pass; the aggregated loss is sum_t w_t loss_t with
// w = mask * row_scale (token-mean: 1/n_tokens; seq-mean-token-mean: 1/(len_b n_seqs); seq-mean-token-sum: 1/n_seqs)
// ---------------------------------------------------------------------------------------------------------------

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
  const Tensor adv = adv_in.to(at::kFloat).contiguous(), mask = as_float_mask(mask_in);
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
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
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
  Tensor stats = torch::tensor({static_cast<float>(sums[2] / n), static_cast<float>(sums[3] / n),
                                static_cast<float>(sums[4] / n), static_cast<float>(sums[5] / n),
                                static_cast<float>(sums[6])});
  return {torch::tensor(static_cast<float>(sums[0])), grad, stats};
}

// Returns loss (0-dim), grad (B, T) float32 (d loss / d values), stats [value clip fraction].
std::vector<Tensor> ppo_value_loss(const Tensor& values_in, const Tensor& old_in, const Tensor& returns_in,
                                   const Tensor& mask_in, double clip, int64_t agg, double denominator) {
  check_bt(values_in, mask_in, "values");
  check_bt(old_in, mask_in, "old_values");
  check_bt(returns_in, mask_in, "returns");
  const Tensor v = values_in.to(at::kFloat).contiguous(), old = old_in.to(at::kFloat).contiguous();
  const Tensor ret = returns_in.to(at::kFloat).contiguous(), mask = as_float_mask(mask_in);
  const int64_t B = v.size(0), T = v.size(1);
  const float *vv = v.data_ptr<float>(), *o = old.data_ptr<float>(), *r = ret.data_ptr<float>();
  const float* m = mask.data_ptr<float>();
  const std::vector<double> scale = row_scales(m, B, T, agg, denominator);
  Tensor grad = at::empty({B, T}, v.options());
  float* g = grad.data_ptr<float>();
  const bool use_clip = clip >= 0;
  const float bound = static_cast<float>(clip);
  std::vector<double> partials(B * 3, 0.0);  // loss, n_valid, clipped
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
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
  return {torch::tensor(static_cast<float>(loss)), grad,
          torch::tensor({static_cast<float>(clipped / std::max(n, 1.0))})};
}

}  // namespace fastppo

TORCH_LIBRARY(fastppo, m) {
  m.def("token_logprobs_forward(Tensor logits, Tensor tokens, float inv_temperature) -> Tensor[]");
  m.def("token_logprobs_backward(Tensor logits, Tensor tokens, Tensor lse, Tensor entropy, Tensor grad_logprobs, "
        "Tensor? grad_entropy, float inv_temperature) -> Tensor");
  m.def("kl_penalty_forward(Tensor logprobs, Tensor ref_logprobs, int estimator) -> Tensor");
  m.def("kl_penalty_backward(Tensor logprobs, Tensor ref_logprobs, Tensor grad, int estimator) -> Tensor");
  m.def("shape_rewards(Tensor scores, Tensor logprobs, Tensor ref_logprobs, Tensor response_mask, float kl_coef, "
        "int estimator) -> Tensor[]");
  m.def("gae(Tensor rewards, Tensor values, Tensor response_mask, float gamma, float lam) -> Tensor[]");
  m.def("masked_whiten(Tensor x, Tensor mask, bool shift_mean, float eps) -> Tensor");
  m.def("ppo_policy_loss(Tensor logprobs, Tensor old_logprobs, Tensor advantages, Tensor response_mask, "
        "float clip_low, float clip_high, float dual_clip, int agg, float denominator) -> Tensor[]");
  m.def("ppo_value_loss(Tensor values, Tensor old_values, Tensor returns, Tensor response_mask, float clip, "
        "int agg, float denominator) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(fastppo, CPU, m) {
  m.impl("token_logprobs_forward", &fastppo::token_logprobs_forward);
  m.impl("token_logprobs_backward", &fastppo::token_logprobs_backward);
  m.impl("kl_penalty_forward", &fastppo::kl_penalty_forward);
  m.impl("kl_penalty_backward", &fastppo::kl_penalty_backward);
  m.impl("shape_rewards", &fastppo::shape_rewards);
  m.impl("gae", &fastppo::gae);
  m.impl("masked_whiten", &fastppo::masked_whiten);
  m.impl("ppo_policy_loss", &fastppo::ppo_policy_loss);
  m.impl("ppo_value_loss", &fastppo::ppo_value_loss);
}

PYBIND11_MODULE(_C, module) {
  module.doc() = "fastppo native CPU kernels; the ops are registered as torch.ops.fastppo.*";
  module.def("build_info", [] {
    pybind11::dict info;
    info["threads"] = at::get_num_threads();
    info["parallel"] = at::get_parallel_info();
    info["cuda"] = false;
    return info;
  });
}
