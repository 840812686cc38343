// Absorbed MLA decode attention straight off the paged latent cache, fp32 math over an fp32 or a
// bf16 cache (bf16 rows are widened exactly as they are loaded):
//   out[b, h] = sum_l softmax_l(scale * q[b, h] . kv[s_l]) * kv[s_l, :r],  s_l = slots[b, l],
// l < lengths[b]: one query per sequence, every head against the same latent rows [c_kv | k_pe],
// with no gathered copy of the context. Split over (sequence, group of heads). Context rows are
// taken in blocks that stay in cache while every head of the task uses them: 8 rows per score
// pass (one load of a query vector serves 8 rows), 8 rows per pass of the weighted sum (whose
// outputs are held in registers 32 values at a time).
// Twin: kernels/mla_decode.py's mla_decode_ref (the contract of the Triton kernel).

#include <algorithm>
#include <cmath>
#include <vector>

#include "ops.h"

namespace k2 {
namespace {

constexpr int64_t kScoreRows = 8, kSumRows = 8;

// 8 cache values as fp32, and one; for an fp32 cache (float) or a bf16 one (its bits, uint16_t).
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) { return load_bf16x8(p); }
inline float widen(float v) { return v; }
inline float widen(uint16_t v) { return bf16_to_float(v); }

// q . row over n values.
template <typename T>
inline float dot_row(const float* q, const T* row, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t c = 0;
  for (; c + 8 <= n; c += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + c), load8(row + c), acc);
  float s = hsum(acc);
  for (; c < n; ++c) s += q[c] * widen(row[c]);
  return s;
}

// scores[j] = scale * q . rows[j] for kScoreRows rows at once.
template <typename T>
inline void dot_rows(const float* q, const T* const* rows, int64_t width, float scale,
                     float* scores) {
  __m256 acc[kScoreRows];
  for (int j = 0; j < kScoreRows; ++j) acc[j] = _mm256_setzero_ps();
  int64_t c = 0;
  for (; c + 8 <= width; c += 8) {
    const __m256 qv = _mm256_loadu_ps(q + c);
    for (int j = 0; j < kScoreRows; ++j) acc[j] = _mm256_fmadd_ps(load8(rows[j] + c), qv, acc[j]);
  }
  for (int j = 0; j < kScoreRows; ++j) {
    float sum = hsum(acc[j]);
    for (int64_t t = c; t < width; ++t) sum += q[t] * widen(rows[j][t]);
    scores[j] = scale * sum;
  }
}

// out[0 .. r) += sum_l p[l] * rows[l][0 .. r) over n rows, 32 outputs at a time in registers.
template <typename T>
inline void add_weighted(const float* p, const T* const* rows, int64_t n, int64_t r, float* out) {
  int64_t c = 0;
  for (; c + 32 <= r; c += 32) {
    __m256 acc[4];
    for (int j = 0; j < 4; ++j) acc[j] = _mm256_loadu_ps(out + c + 8 * j);
    for (int64_t l = 0; l < n; ++l) {
      const __m256 pl = _mm256_set1_ps(p[l]);
      for (int j = 0; j < 4; ++j)
        acc[j] = _mm256_fmadd_ps(pl, load8(rows[l] + c + 8 * j), acc[j]);
    }
    for (int j = 0; j < 4; ++j) _mm256_storeu_ps(out + c + 8 * j, acc[j]);
  }
  for (int64_t l = 0; l < n; ++l)
    for (int64_t t = c; t < r; ++t) out[t] += p[l] * widen(rows[l][t]);
}

// p[0 .. n) = softmax(p[0 .. n)), exponentials 8 at a time.
inline void softmax(float* p, int64_t n) {
  const __m256 top = _mm256_set1_ps(*std::max_element(p, p + n));
  __m256 sum = _mm256_setzero_ps();
  int64_t l = 0;
  for (; l + 8 <= n; l += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p + l), top));
    _mm256_storeu_ps(p + l, e);
    sum = _mm256_add_ps(sum, e);
  }
  float total = hsum(sum);
  for (; l < n; ++l) total += (p[l] = std::exp(p[l] - _mm256_cvtss_f32(top)));
  const float inv = 1.0f / total;
  for (l = 0; l < n; ++l) p[l] *= inv;
}


// The checked call's work: per (sequence, group of heads) task, scores, softmax, weighted sum.
template <typename T>
void attend(const at::Tensor& q, const T* kp, const int64_t* sp, const int64_t* lp,
            int64_t width_l, float s, int64_t r, at::Tensor& out) {
  const int64_t b = q.size(0), h = q.size(1), width = q.size(2);
  const float* qp = q.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int threads = at::get_num_threads();
  // Enough tasks for every thread even at batch 1: heads are split into groups.
  const int64_t groups = std::min<int64_t>(h, std::max<int64_t>(1, (threads + b - 1) / b));
  const int64_t per = (h + groups - 1) / groups;
  at::parallel_for(0, b * groups, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> p;
    std::vector<const T*> rows;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t i = task / groups, h0 = (task % groups) * per, h1 = std::min(h, h0 + per);
      const int64_t n = lp[i];
      rows.resize(n);
      for (int64_t l = 0; l < n; ++l) rows[l] = kp + sp[i * width_l + l] * width;
      p.assign((h1 - h0) * n, 0.0f);
      for (int64_t l0 = 0; l0 < n; l0 += kScoreRows) {
        const int64_t lb = std::min(kScoreRows, n - l0);
        for (int64_t hh = h0; hh < h1; ++hh) {
          const float* qh = qp + (i * h + hh) * width;
          float* ph = p.data() + (hh - h0) * n + l0;
          if (lb == kScoreRows) {
            dot_rows(qh, rows.data() + l0, width, s, ph);
          } else {
            for (int64_t l = 0; l < lb; ++l) ph[l] = s * dot_row(qh, rows[l0 + l], width);
          }
        }
      }
      for (int64_t hh = h0; hh < h1; ++hh) {
        softmax(p.data() + (hh - h0) * n, n);
        std::fill(op + (i * h + hh) * r, op + (i * h + hh + 1) * r, 0.0f);
      }
      for (int64_t l0 = 0; l0 < n; l0 += kSumRows) {
        const int64_t lb = std::min(kSumRows, n - l0);
        for (int64_t hh = h0; hh < h1; ++hh)
          add_weighted(p.data() + (hh - h0) * n + l0, rows.data() + l0, lb, r,
                       op + (i * h + hh) * r);
      }
    }
  });
}

}  // namespace

void mla_decode(const at::Tensor& q, const at::Tensor& kv, const at::Tensor& slots,
                const at::Tensor& lengths, double scale, int64_t r, at::Tensor& out) {
  TORCH_CHECK(q.scalar_type() == at::kFloat && q.dim() == 3 && q.is_contiguous(),
              "mla_decode: q must be a contiguous [B, H, r + d_r] float32 tensor");
  const bool bf16 = kv.scalar_type() == at::kBFloat16;
  TORCH_CHECK((bf16 || kv.scalar_type() == at::kFloat) && kv.dim() == 2 && kv.is_contiguous() &&
                  kv.size(1) == q.size(2),
              "mla_decode: kv must be a contiguous [slots, r + d_r] float32 or bfloat16 tensor");
  const int64_t b = q.size(0), h = q.size(1), width = q.size(2), n_slots = kv.size(0);
  TORCH_CHECK(r > 0 && r <= width, "mla_decode: r ", r, " outside (0, ", width, "]");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.dim() == 2 && slots.size(0) == b &&
                  slots.is_contiguous(),
              "mla_decode: slots must be a contiguous [B, L] int64 tensor");
  TORCH_CHECK(lengths.scalar_type() == at::kLong && lengths.dim() == 1 && lengths.size(0) == b,
              "mla_decode: lengths must be a [B] int64 tensor");
  check_out(out, {b, h, r});
  const int64_t width_l = slots.size(1);
  const int64_t* sp = slots.data_ptr<int64_t>();
  const auto len = lengths.contiguous();
  const int64_t* lp = len.data_ptr<int64_t>();
  for (int64_t i = 0; i < b; ++i) {
    TORCH_CHECK(lp[i] >= 1 && lp[i] <= width_l, "mla_decode: length ", lp[i], " outside [1, ",
                width_l, "]");
    for (int64_t l = 0; l < lp[i]; ++l)
      TORCH_CHECK(sp[i * width_l + l] >= 0 && sp[i * width_l + l] < n_slots,
                  "mla_decode: slot ", sp[i * width_l + l], " outside the cache");
  }
  if (bf16) {
    attend(q, reinterpret_cast<const uint16_t*>(kv.data_ptr<at::BFloat16>()), sp, lp, width_l,
           static_cast<float>(scale), r, out);
  } else {
    attend(q, kv.data_ptr<float>(), sp, lp, width_l, static_cast<float>(scale), r, out);
  }
}

}  // namespace k2
