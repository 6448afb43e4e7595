// Log-probs of the sampled tokens and the entropy, in one pass over each row of logits, without an (N, V) buffer.
//
// With z = logits / T, m the running max, s = sum e^{z - m} and a = sum e^{z - m} (z - m):
//   logsumexp = m + log s,   logp_t = z_t - logsumexp,   H = -sum p log p = log s - a / s
// The row is read in blocks that stay in L1: the block's max, then its exp-sums against the running max (an online
// logsumexp over blocks; s and a are rescaled when the max grows), so the logits are streamed from memory once.
// Backward, with g = d loss / d logp and h = d loss / d H:
//   d loss / d z_j = g (onehot_j - p_j) - h p_j (log p_j + H),   d loss / d logits = that / T

#include "common.h"

#include <c10/util/accumulate.h>

#include <cstdlib>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fastppo {

// Elements per block: 2 KiB of float32 stays in L1 between the block's max and its exp-sums.
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

// out_j = -(g p_j + h p_j (log p_j + H)): the gradient without the one-hot term, which the caller adds.
FASTPPO_SIMD static void grad_block(const float* x, float* out, int64_t n, float inv_t, float lse, float entropy,
                                    float g, float h) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const float logp = x[j] * inv_t - lse;
    const float p = fast_exp(logp);
    out[j] = -g * p - (p > 0 ? h * p * (logp + entropy) : 0.0f);
  }
}

// out_j = -g p_j: the same without the entropy term, for a backward where only the log-probs have a gradient.
FASTPPO_SIMD static void logp_grad_block(const float* x, float* out, int64_t n, float inv_t, float lse, float g) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) out[j] = -g * fast_exp(x[j] * inv_t - lse);
}

// A block of a row as float32: the row itself for float32 input, else converted into `buffer`.
template <typename scalar_t>
static const float* as_float(const scalar_t* x, int64_t n, float* buffer) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return x;
  } else {
    for (int64_t j = 0; j < n; ++j) buffer[j] = static_cast<float>(x[j]);
    return buffer;
  }
}

template <typename scalar_t>
static void forward_rows(const scalar_t* logits, int64_t row_stride, const int64_t* tokens, int64_t N, int64_t V,
                         float inv_t, float* logprobs, float* entropy, float* lse_out) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  at::parallel_for(0, N, row_grain(V), [&](int64_t begin, int64_t end) {
    std::vector<float> z(kBlock), buffer(kBlock);
    for (int64_t row = begin; row < end; ++row) {
      const scalar_t* x = logits + row * row_stride;
      float m = kNegInf, s = 0, a = 0;
      for (int64_t start = 0; start < V; start += kBlock) {
        const int64_t n = std::min(kBlock, V - start);
        const float block_max = scale_and_max(as_float(x + start, n, buffer.data()), n, inv_t, z.data());
        if (block_max == kNegInf) continue;  // only -inf logits here: they add nothing
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
      if (m == -kNegInf) s = a = std::numeric_limits<float>::quiet_NaN();  // a +inf logit: like log_softmax, nan
      const float lse = m + std::log(s);  // -inf for a row of -inf only, so its log-probs are nan, like log_softmax
      logprobs[row] = static_cast<float>(x[tokens[row]]) * inv_t - lse;
      entropy[row] = std::log(s) - a / s;
      lse_out[row] = lse;
    }
  });
}

// The (N, V) gradient is fresh memory that the backward writes once. On 4 KiB pages its first touch (a page fault per
// 4 KiB) cost more than the kernel itself at the benchmark's sizes (bench/README.md); allocated 2 MiB-aligned with
// MADV_HUGEPAGE it takes 512 times fewer faults where the kernel allows transparent huge pages (and is plain memory
// where it does not).
static Tensor empty_on_huge_pages(at::IntArrayRef sizes, const at::TensorOptions& options) {
  constexpr size_t kHugePage = size_t(2) << 20;
  const size_t bytes = static_cast<size_t>(c10::multiply_integers(sizes)) * options.dtype().itemsize();
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (bytes >= kHugePage) {
    const size_t rounded = (bytes + kHugePage - 1) / kHugePage * kHugePage;
    if (void* data = std::aligned_alloc(kHugePage, rounded)) {
      madvise(data, rounded, MADV_HUGEPAGE);  // advice only: a failure leaves ordinary pages
      return at::from_blob(data, sizes, [](void* p) { std::free(p); }, options);
    }
  }
#endif
  return at::empty(sizes, options);
}

static void check_rows(const Tensor& logits, const Tensor& tokens) {
  check_float(logits, "logits");
  check_cpu(tokens, "tokens");
  TORCH_CHECK(logits.scalar_type() != at::kDouble, "float64 logits go to the reference, not the native kernels");
  TORCH_CHECK(logits.dim() == 2 && logits.stride(1) == 1, "logits must be (N, V) with unit stride along V, got ",
              logits.sizes(), " with strides ", logits.strides());
  TORCH_CHECK(tokens.dim() == 1 && tokens.size(0) == logits.size(0), "tokens must be (N=", logits.size(0),
              ",), got ", tokens.sizes());
  TORCH_CHECK(tokens.scalar_type() == at::kLong, "tokens must be int64, got ", tokens.scalar_type());
  const int64_t V = logits.size(1);
  TORCH_CHECK(V > 0 || logits.size(0) == 0, "logits must have a non-empty vocabulary dimension");
  TORCH_CHECK(tokens.numel() == 0 || (tokens.min().item<int64_t>() >= 0 && tokens.max().item<int64_t>() < V),
              "tokens must lie in [0, V=", V, ")");
}

std::vector<Tensor> token_logprobs_forward(const Tensor& logits, const Tensor& tokens_in, double inv_temperature) {
  const Tensor tokens = tokens_in.contiguous();
  check_rows(logits, tokens);
  const int64_t N = logits.size(0), V = logits.size(1);
  const auto options = logits.options().dtype(at::kFloat);
  Tensor logprobs = at::empty({N}, options), entropy = at::empty({N}, options), lse = at::empty({N}, options);
  FASTPPO_DISPATCH_LOGITS(logits.scalar_type(), "token_logprobs_forward", [&] {
    forward_rows<scalar_t>(logits.const_data_ptr<scalar_t>(), logits.stride(0), tokens.const_data_ptr<int64_t>(), N,
                           V, static_cast<float>(inv_temperature), logprobs.data_ptr<float>(),
                           entropy.data_ptr<float>(), lse.data_ptr<float>());
  });
  return {logprobs, entropy, lse};
}

Tensor token_logprobs_backward(const Tensor& logits, const Tensor& tokens_in, const Tensor& lse_in,
                               const Tensor& entropy_in, const Tensor& grad_logprobs_in,
                               const std::optional<Tensor>& grad_entropy_in, double inv_temperature) {
  const Tensor tokens = tokens_in.contiguous();
  check_rows(logits, tokens);
  const int64_t N = logits.size(0), V = logits.size(1);
  for (const Tensor* t : {&lse_in, &entropy_in, &grad_logprobs_in}) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == N, "logsumexp, entropy and grad_logprobs must be (N=", N, ",)");
  }
  const Tensor lse = as_f32(lse_in), entropy = as_f32(entropy_in), g_logp = as_f32(grad_logprobs_in);
  const bool has_g_entropy = grad_entropy_in.has_value() && grad_entropy_in->defined();
  const Tensor g_entropy = has_g_entropy ? as_f32(*grad_entropy_in) : g_logp;
  TORCH_CHECK(g_entropy.numel() == N, "grad_entropy must be (N=", N, ",)");
  Tensor grad = empty_on_huge_pages({N, V}, logits.options());
  const float inv_t = static_cast<float>(inv_temperature);
  FASTPPO_DISPATCH_LOGITS(logits.scalar_type(), "token_logprobs_backward", [&] {
    const scalar_t* x = logits.const_data_ptr<scalar_t>();
    scalar_t* out = grad.data_ptr<scalar_t>();
    const int64_t* tok = tokens.const_data_ptr<int64_t>();
    const float *lse_p = lse.const_data_ptr<float>(), *h_p = entropy.const_data_ptr<float>();
    const float *gl_p = g_logp.const_data_ptr<float>(), *gh_p = g_entropy.const_data_ptr<float>();
    const int64_t stride = logits.stride(0);
    at::parallel_for(0, N, row_grain(V), [&](int64_t begin, int64_t end) {
      std::vector<float> buffer(kBlock), grad_buffer(kBlock);
      for (int64_t row = begin; row < end; ++row) {
        const scalar_t* xr = x + row * stride;
        scalar_t* gr = out + row * V;
        const float l = lse_p[row], h = h_p[row];
        const float g = gl_p[row] * inv_t, gh = has_g_entropy ? gh_p[row] * inv_t : 0.0f;
        for (int64_t start = 0; start < V; start += kBlock) {
          const int64_t n = std::min(kBlock, V - start);
          const float* xf = as_float(xr + start, n, buffer.data());
          // float32 gradients are written in place; 16-bit ones through a float32 buffer (the cast only type-checks
          // the float32 case, which is the only one that uses it).
          float* dst = std::is_same_v<scalar_t, float> ? reinterpret_cast<float*>(gr + start) : grad_buffer.data();
          if (has_g_entropy) {
            grad_block(xf, dst, n, inv_t, l, h, g, gh);
          } else {
            logp_grad_block(xf, dst, n, inv_t, l, g);
          }
          if constexpr (!std::is_same_v<scalar_t, float>) {
            for (int64_t j = 0; j < n; ++j) gr[start + j] = static_cast<scalar_t>(grad_buffer[j]);
          }
        }
        const int64_t t = tok[row];
        const float logp_t = static_cast<float>(xr[t]) * inv_t - l;
        const float p_t = fast_exp(logp_t);
        gr[t] = static_cast<scalar_t>(g * (1 - p_t) - (p_t > 0 ? gh * p_t * (logp_t + h) : 0.0f));
      }
    });
  });
  return grad;
}

}  // namespace fastppo
