// Drawing the next token from logits: inverse-CDF sampling in three passes over each row, no (B, V) buffer.
//
// With z = logits / T and m = max z, the unnormalized probabilities are e_j = exp(z_j - m) and s = sum e_j. For a
// uniform u in [0, 1) the token is the first j whose running sum e_0 + ... + e_j exceeds u s:
//   pass 1  m                                  (vectorized max)
//   pass 2  the sum of each block of e_j       (vectorized exp + sum, kept per block, added up in double)
//   pass 3  walk the block sums to the block holding u s, then the running sum inside it (e_j recomputed with the
//           same function, so bitwise the values pass 2 summed; the sums themselves round differently, float
//           within a block there, double here, so u s can land just past the block's end: then its last token)
// A token of probability 0 (a -inf logit: top-k / top-p masking) adds 0 and can never be the first to exceed u s.
// This replaces softmax + a float64 cumsum + searchsorted, which write and read three (B, V) tensors per decode step.
// The drawn token's log-prob comes with it: z_j - m - log s, from the m and s the passes computed.
// A row that is no distribution (a nan or +inf logit, or only -inf) gets token -1 (log-prob nan), for the caller
// to report.

#include <tuple>
#include <utility>

#include "common.h"

namespace fastppo {

constexpr int64_t kSampleBlock = 512;

// The row's max, or nan if the row holds a nan (a vectorized max may skip nans, so they are counted).
FASTPPO_SIMD static float row_max(const float* x, int64_t n) {
  float m = -std::numeric_limits<float>::infinity(), nans = 0;
#pragma omp simd reduction(max : m) reduction(+ : nans)
  for (int64_t j = 0; j < n; ++j) {
    m = std::max(m, x[j]);
    nans += x[j] != x[j] ? 1.0f : 0.0f;
  }
  return nans > 0 ? std::numeric_limits<float>::quiet_NaN() : m;
}

// sum_j exp(x_j inv_t - shift) over a block
FASTPPO_SIMD static float block_exp_sum(const float* x, int64_t n, float inv_t, float shift) {
  float s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; ++j) s += fast_exp(x[j] * inv_t - shift);
  return s;
}

// The token drawn from one row, and its log-prob.
template <typename scalar_t>
static std::pair<int64_t, float> sample_row(const scalar_t* row, int64_t V, float inv_t, double u,
                                            std::vector<float>& buffer, std::vector<double>& block_sums) {
  constexpr float kNan = std::numeric_limits<float>::quiet_NaN();
  const float* x = reinterpret_cast<const float*>(row);
  if constexpr (!std::is_same_v<scalar_t, float>) {  // 16-bit logits: one float32 copy of the row
    for (int64_t j = 0; j < V; ++j) buffer[j] = static_cast<float>(row[j]);
    x = buffer.data();
  }
  const float m = row_max(x, V) * inv_t;  // inv_t > 0, so the max of z is the max of x times inv_t
  if (!std::isfinite(m)) return {-1, kNan};
  double total = 0;
  const int64_t n_blocks = (V + kSampleBlock - 1) / kSampleBlock;
  for (int64_t b = 0; b < n_blocks; ++b) {
    const int64_t start = b * kSampleBlock;
    block_sums[b] = block_exp_sum(x + start, std::min(kSampleBlock, V - start), inv_t, m);
    total += block_sums[b];
  }
  if (!(total > 0) || !std::isfinite(total)) return {-1, kNan};
  const double log_total = std::log(total);
  auto drawn = [&](int64_t j) { return std::pair<int64_t, float>{j, x[j] * inv_t - m - log_total}; };
  const double target = u * total;
  double below = 0;  // the sum of every block before block b
  int64_t b = 0;
  while (b < n_blocks - 1 && below + block_sums[b] <= target) below += block_sums[b++];
  int64_t last_positive = -1;
  const int64_t start = b * kSampleBlock, end = std::min(start + kSampleBlock, V);
  for (int64_t j = start; j < end; ++j) {
    const float e = fast_exp(x[j] * inv_t - m);
    if (e > 0) last_positive = j;
    below += e;
    if (below > target) return drawn(j);
  }
  // Rounding put u s at the very end of the block (its float sum exceeded the running double one): take its last
  // token of nonzero probability.
  return drawn(last_positive);
}

std::vector<Tensor> sample_tokens(const Tensor& logits, const Tensor& uniform_in, double inv_temperature) {
  check_float(logits, "logits");
  TORCH_CHECK(logits.dim() == 2 && logits.stride(1) == 1, "logits must be (B, V) with unit stride along V, got ",
              logits.sizes());
  TORCH_CHECK(inv_temperature > 0, "inv_temperature must be > 0 (temperature 0 is greedy: argmax)");
  const int64_t B = logits.size(0), V = logits.size(1);
  const Tensor uniform = uniform_in.to(at::kDouble).contiguous();
  TORCH_CHECK(uniform.numel() == B, "uniform must hold one number per row (B=", B, "), got ", uniform.numel());
  Tensor tokens = at::empty({B}, logits.options().dtype(at::kLong));
  Tensor logprobs = at::empty({B}, logits.options().dtype(at::kFloat));
  FASTPPO_DISPATCH_LOGITS(logits.scalar_type(), "sample_tokens", [&] {
    const scalar_t* x = logits.const_data_ptr<scalar_t>();
    const double* u = uniform.const_data_ptr<double>();
    int64_t* out = tokens.data_ptr<int64_t>();
    float* out_logprobs = logprobs.data_ptr<float>();
    at::parallel_for(0, B, row_grain(V), [&](int64_t begin, int64_t end) {
      std::vector<float> buffer(std::is_same_v<scalar_t, float> ? 0 : V);
      std::vector<double> block_sums((V + kSampleBlock - 1) / kSampleBlock);
      for (int64_t row = begin; row < end; ++row) {
        std::tie(out[row], out_logprobs[row]) = sample_row(x + row * logits.stride(0), V,
                                                           static_cast<float>(inv_temperature), u[row], buffer,
                                                           block_sums);
      }
    });
  });
  return {tokens, logprobs};
}

}  // namespace fastppo
