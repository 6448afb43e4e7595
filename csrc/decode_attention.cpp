// One decode step of rotary attention over a KV cache (reference: decode_attention in fastppo/ops/reference.py).
//
// A decode step on a CPU attends one new query per row and head over at most a few thousand cached positions: a
// few MFLOP, less time than the dozen small ops that stock PyTorch needs for it (views, the rotary embedding as
// rotate_half + cat + mul + add, two cache writes, scaled_dot_product_attention: bench_ops' decode_attention rows
// compare the two). Here, per row b, all in one pass:
//   rotate its key and write it, with its value, at cache position n - 1 of each key/value head g
//   for each head h (g = h / (heads / G)): q' = rotate(q_h); s_j = q' . k_j scale over the unmasked positions j;
//     out_h = sum_j exp(s_j - max s) v_j / sum_j exp(s_j - max s)
// with rotate(x)_d = x_d cos_d - x_{d + D/2} sin_d for d < D/2, x_d cos_d + x_{d - D/2} sin_d above (rotate-half).
// Math in float32 (the scores and the softmax sum too: at most L terms of at most 1 each), inputs and outputs in
// float32, bf16 or fp16.

#include "common.h"

namespace fastppo {

// x' = rotate(x) for one head of D values (D even), in float32.
template <typename scalar_t>
static void rotate_half(const scalar_t* x, const float* cos, const float* sin, int64_t D, float* out) {
  const int64_t half = D / 2;
  for (int64_t d = 0; d < half; ++d) {
    const float a = static_cast<float>(x[d]), b = static_cast<float>(x[d + half]);
    out[d] = a * cos[d] - b * sin[d];
    out[d + half] = b * cos[d + half] + a * sin[d + half];
  }
}

// One head: scores s_j = q . k_j scale over the unmasked positions j < n, then out = softmax(s) v, for K and V
// float32 rows at the given strides. Two loop orders keep the vector units busy: the dot products four positions
// at a time (four independent sums to reduce, not one chain), and the weighted sum of values one 16-wide slice of
// out at a time over all positions (the slice stays in a register instead of being stored and reloaded per j).
FASTPPO_SIMD static void attend(const float* q, const float* K, int64_t k_stride, const float* V, int64_t v_stride,
                                const bool* mask, int64_t n, int64_t D, float scale, float* scores, float* out) {
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    const float *k0 = K + j * k_stride, *k1 = k0 + k_stride, *k2 = k1 + k_stride, *k3 = k2 + k_stride;
    float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
    for (int64_t d = 0; d < D; ++d) {
      s0 += q[d] * k0[d];
      s1 += q[d] * k1[d];
      s2 += q[d] * k2[d];
      s3 += q[d] * k3[d];
    }
    scores[j] = s0, scores[j + 1] = s1, scores[j + 2] = s2, scores[j + 3] = s3;
  }
  for (; j < n; ++j) {
    const float* k = K + j * k_stride;
    float s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t d = 0; d < D; ++d) s += q[d] * k[d];
    scores[j] = s;
  }
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  float max_score = kNegInf;
  for (j = 0; j < n; ++j) {
    scores[j] = mask[j] ? scores[j] * scale : kNegInf;
    max_score = std::max(max_score, scores[j]);
  }
  if (max_score == kNegInf) {  // nothing to attend to: zeros
    std::fill(out, out + D, 0.0f);
    return;
  }
  float total = 0;
#pragma omp simd reduction(+ : total)
  for (j = 0; j < n; ++j) {
    scores[j] = fast_exp(scores[j] - max_score);  // exactly 0 at a masked position
    total += scores[j];
  }
  const float inv_total = 1.0f / total;
  constexpr int64_t kSlice = 16;
  for (int64_t d0 = 0; d0 < D; d0 += kSlice) {
    const int64_t width = std::min(kSlice, D - d0);
    float acc[kSlice] = {};
    for (j = 0; j < n; ++j) {
      const float w = scores[j];
      const float* v = V + j * v_stride + d0;
#pragma omp simd
      for (int64_t i = 0; i < kSlice; ++i) acc[i] += i < width ? w * v[i] : 0.0f;
    }
    for (int64_t i = 0; i < width; ++i) out[d0 + i] = acc[i] * inv_total;
  }
}

// The (n, D) rows of one cache head as float32: the cache itself for float32, else a converted copy in `buffer`.
template <typename scalar_t>
static const float* head_rows(const scalar_t* head, int64_t stride, int64_t n, int64_t D, std::vector<float>& buffer,
                              int64_t& float_stride) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    float_stride = stride;
    return head;
  } else {
    buffer.resize(n * D);
    for (int64_t j = 0; j < n; ++j)
      for (int64_t d = 0; d < D; ++d) buffer[j * D + d] = static_cast<float>(head[j * stride + d]);
    float_stride = D;
    return buffer.data();
  }
}

Tensor decode_attention(const Tensor& qkv_in, const Tensor& cos_in, const Tensor& sin_in, Tensor& keys,
                        Tensor& values, const Tensor& key_mask_in, int64_t heads, double scale) {
  check_float(qkv_in, "qkv");
  check_float(keys, "keys");
  TORCH_CHECK(keys.dim() == 4 && values.sizes() == keys.sizes(), "keys and values must be (B, G, L, D) alike, got ",
              keys.sizes(), " and ", values.sizes());
  TORCH_CHECK(keys.scalar_type() == qkv_in.scalar_type() && values.scalar_type() == qkv_in.scalar_type(),
              "qkv, keys and values must share a dtype");
  TORCH_CHECK(keys.stride(3) == 1 && values.stride(3) == 1, "keys and values need unit stride along D");
  const int64_t B = keys.size(0), G = keys.size(1), L = keys.size(2), D = keys.size(3);
  const int64_t n = key_mask_in.size(1);
  TORCH_CHECK(heads > 0 && heads % G == 0, "heads (", heads, ") must be a multiple of the key/value heads (", G, ")");
  TORCH_CHECK(D % 2 == 0, "the head size must be even for the rotary embedding, got ", D);
  TORCH_CHECK(qkv_in.dim() == 2 && qkv_in.size(0) == B && qkv_in.size(1) == (heads + 2 * G) * D,
              "qkv must be (B, (heads + 2 G) D) = (", B, ", ", (heads + 2 * G) * D, "), got ", qkv_in.sizes());
  TORCH_CHECK(key_mask_in.dim() == 2 && key_mask_in.size(0) == B && n >= 1 && n <= L,
              "key_mask must be (B, n) with 1 <= n <= L = ", L, ", got ", key_mask_in.sizes());
  const Tensor qkv = qkv_in.contiguous();
  const Tensor cos = as_f32(cos_in).reshape({B, D}), sin = as_f32(sin_in).reshape({B, D});
  const Tensor key_mask = key_mask_in.to(at::kBool).contiguous();
  Tensor out = at::empty({B, heads * D}, qkv.options());
  const int64_t group = heads / G;
  const int64_t kb = keys.stride(0), kg = keys.stride(1), kl = keys.stride(2);
  const int64_t vb = values.stride(0), vg = values.stride(1), vl = values.stride(2);
  FASTPPO_DISPATCH_LOGITS(qkv.scalar_type(), "decode_attention", [&] {
    const scalar_t* x = qkv.const_data_ptr<scalar_t>();
    scalar_t* K = keys.data_ptr<scalar_t>();
    scalar_t* V = values.data_ptr<scalar_t>();
    const bool* mask = key_mask.const_data_ptr<bool>();
    scalar_t* y = out.data_ptr<scalar_t>();
    // Rows are independent; a row's work is heads * n * D multiply-adds, twice.
    at::parallel_for(0, B, row_grain(2 * heads * n * D), [&](int64_t begin, int64_t end) {
      std::vector<float> rotated(D), accumulator(D), scores(n), k_buffer, v_buffer;
      for (int64_t b = begin; b < end; ++b) {
        const scalar_t* row = x + b * (heads + 2 * G) * D;
        const float* c = cos.const_data_ptr<float>() + b * D;
        const float* s = sin.const_data_ptr<float>() + b * D;
        const bool* m = mask + b * n;
        for (int64_t g = 0; g < G; ++g) {  // the new key (rotated) and value into the cache
          rotate_half(row + (heads + g) * D, c, s, D, rotated.data());
          scalar_t* k_new = K + b * kb + g * kg + (n - 1) * kl;
          scalar_t* v_new = V + b * vb + g * vg + (n - 1) * vl;
          const scalar_t* v_src = row + (heads + G + g) * D;
          for (int64_t d = 0; d < D; ++d) {
            k_new[d] = static_cast<scalar_t>(rotated[d]);
            v_new[d] = v_src[d];
          }
        }
        for (int64_t g = 0; g < G; ++g) {  // the heads that read key/value head g, over its rows in float32
          int64_t k_stride, v_stride;
          const float* k_rows = head_rows(K + b * kb + g * kg, kl, n, D, k_buffer, k_stride);
          const float* v_rows = head_rows(V + b * vb + g * vg, vl, n, D, v_buffer, v_stride);
          for (int64_t h = g * group; h < (g + 1) * group; ++h) {
            rotate_half(row + h * D, c, s, D, rotated.data());
            attend(rotated.data(), k_rows, k_stride, v_rows, v_stride, m, n, D, static_cast<float>(scale),
                   scores.data(), accumulator.data());
            scalar_t* y_head = y + b * heads * D + h * D;
            for (int64_t d = 0; d < D; ++d) y_head[d] = static_cast<scalar_t>(accumulator[d]);
          }
        }
      }
    });
  });
  return out;
}

}  // namespace fastppo
