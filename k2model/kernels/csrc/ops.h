// The CPU ops of k2model's extension (built by k2model/kernels/cpu_ext.py), one file each, and the
// AVX2 helpers they share. Every op writes into an `out` its Python caller allocated, so tests can
// poison it; each has a plain-torch twin on the Python side.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>

namespace k2 {

// 8 bf16 values widened to fp32 (exact: the bits shifted left by 16).
inline __m256 load_bf16x8(const uint16_t* p) {
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

inline float bf16_to_float(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// sum_i a[i] * b[i] over n fp32 values.
inline float dot(const float* a, const float* b, int64_t n) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
  }
  for (; i + 8 <= n; i += 8)
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
  float s = hsum(_mm256_add_ps(acc0, acc1));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// y[i] += a * x[i] over n fp32 values.
inline void axpy(float a, const float* x, float* y, int64_t n) {
  const __m256 av = _mm256_set1_ps(a);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
  for (; i < n; ++i) y[i] += a * x[i];
}

// e^x for 8 fp32 values (Cephes' polynomial, ~1 ulp; x clamped to +-88.38).
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-88.3762626647949f)),
                    _mm256_set1_ps(88.3762626647949f));
  __m256 fx = _mm256_floor_ps(
      _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  const __m256i n = _mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127));
  return _mm256_mul_ps(y, _mm256_castsi256_ps(_mm256_slli_epi32(n, 23)));
}

// out[i] = silu(gate[i]) * up[i] over n fp32 values, silu(g) = g / (1 + e^-g).
inline void silu_mul(const float* gate, const float* up, float* out, int64_t n) {
  const __m256 one = _mm256_set1_ps(1.0f);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 g = _mm256_loadu_ps(gate + i);
    const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), g));
    _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(one, e)),
                                            _mm256_loadu_ps(up + i)));
  }
  for (; i < n; ++i) out[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
}

inline const uint16_t* bf16_bits(const at::Tensor& w) {
  return reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
}

void check_out(const at::Tensor& out, at::IntArrayRef shape);

// y[m, n] = x[m, :] . w[n, :] for fp32 x and W = bf16 (its bits, uint16_t) or fp32 w, split
// over blocks of n on torch's threads (serially inside another parallel region).
// Strides: x row m at x + m * ldx, w row n at w + n * ldw, y[m, n] at y + m * ldy + n; for
// heads > 1, head h adds h * (x_h, w_h, y_h) to each.
template <typename W>
struct Gemm {
  const float* x;
  int64_t ldx, x_h;
  const W* w;
  int64_t ldw, w_h;
  float* y;
  int64_t ldy, y_h;
  int64_t heads, m, n, k;
};
template <typename W>
void gemm(const Gemm<W>& g);
// The same for weight rows n0 .. n1 - 1 only (heads = 1), on the calling thread.
template <typename W>
void gemm_rows(const Gemm<W>& g, int64_t n0, int64_t n1);
constexpr int64_t kGemmBlock = 64;  // weight rows per task of gemm

void linear(const at::Tensor& x, const at::Tensor& w, at::Tensor& out);
void head_linear(const at::Tensor& x, const at::Tensor& w, at::Tensor& out);
void routed_experts(const at::Tensor& x, const at::Tensor& ids, const at::Tensor& weights,
                    const at::Tensor& gate_up, const at::Tensor& down, at::Tensor& out);
void routed_experts_int4(const at::Tensor& x, const at::Tensor& ids, const at::Tensor& weights,
                         const at::Tensor& gate_up, const at::Tensor& gate_up_scale,
                         const at::Tensor& down, const at::Tensor& down_scale, at::Tensor& out);
void rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps, at::Tensor& out);
void mla_decode(const at::Tensor& q, const at::Tensor& kv, const at::Tensor& slots,
                const at::Tensor& lengths, double scale, int64_t r, at::Tensor& out);

}  // namespace k2
