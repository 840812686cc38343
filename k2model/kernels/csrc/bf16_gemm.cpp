// fp32 activations times bf16-resident weights on AVX2 CPUs, accumulating in fp32.
//
// y[m, n] = sum_k x[m, k] * float(w[n, k]). A bf16 value widens to fp32 exactly (its bits shifted
// left by 16), so this is the fp32 product of the fp32 activations with the checkpoint's own bf16
// weights, reading half the bytes: decode is bound by weight reads. Twin: F.linear(x, w.float()).
//
// Work is split over blocks of output features (torch's intra-op pool); within a block, tiles of
// up to 4 activation rows x 2 weight rows keep 8 accumulators in registers, each weight vector
// loaded once per tile and each activation vector once per pair of weight rows.

#include <immintrin.h>
#include <torch/extension.h>

#include <algorithm>
#include <cstring>
#include <cstdint>

namespace {

constexpr int64_t kBlockRows = 64;  // output features per task

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

struct Operands {
  const float* x;     // row m at x + m * ldx
  int64_t ldx;
  const uint16_t* w;  // row n at w + n * ldw
  int64_t ldw;
  float* y;           // y[m, n] at y + m * ldy + n
  int64_t ldy;
  int64_t k;
};

// Rows m0 .. m0+MB-1 of x against weight rows n0 .. n1-1, NB weight rows at a time.
template <int MB, int NB>
inline void tile(const Operands& o, int64_t m0, int64_t n) {
  __m256 acc[MB][NB];
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NB; ++j) acc[i][j] = _mm256_setzero_ps();
  const int64_t k8 = o.k & ~int64_t{7};
  for (int64_t k = 0; k < k8; k += 8) {
    __m256 wv[NB];
    for (int j = 0; j < NB; ++j) wv[j] = load_bf16x8(o.w + (n + j) * o.ldw + k);
    for (int i = 0; i < MB; ++i) {
      __m256 xv = _mm256_loadu_ps(o.x + (m0 + i) * o.ldx + k);
      for (int j = 0; j < NB; ++j) acc[i][j] = _mm256_fmadd_ps(xv, wv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < MB; ++i) {
    for (int j = 0; j < NB; ++j) {
      float s = hsum(acc[i][j]);
      for (int64_t k = k8; k < o.k; ++k)
        s += o.x[(m0 + i) * o.ldx + k] * bf16_to_float(o.w[(n + j) * o.ldw + k]);
      o.y[(m0 + i) * o.ldy + n + j] = s;
    }
  }
}

template <int MB>
inline void row_tile(const Operands& o, int64_t m0, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + 2 <= n1; n += 2) tile<MB, 2>(o, m0, n);
  if (n < n1) tile<MB, 1>(o, m0, n);
}

void block(const Operands& o, int64_t m, int64_t n0, int64_t n1) {
  int64_t i = 0;
  for (; i + 4 <= m; i += 4) row_tile<4>(o, i, n0, n1);
  switch (m - i) {
    case 3: row_tile<3>(o, i, n0, n1); break;
    case 2: row_tile<2>(o, i, n0, n1); break;
    case 1: row_tile<1>(o, i, n0, n1); break;
    default: break;
  }
}

void check(const torch::Tensor& x, const torch::Tensor& w, int64_t dims) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "bf16_gemm: CPU tensors only");
  TORCH_CHECK(x.scalar_type() == torch::kFloat32, "bf16_gemm: x must be float32");
  TORCH_CHECK(w.scalar_type() == torch::kBFloat16, "bf16_gemm: w must be bfloat16");
  TORCH_CHECK(x.dim() == dims && w.dim() == dims, "bf16_gemm: expected ", dims, "-d x and w");
  TORCH_CHECK(x.stride(-1) == 1 && w.stride(-1) == 1, "bf16_gemm: last dims must be contiguous");
  TORCH_CHECK(x.size(-1) == w.size(-1), "bf16_gemm: x has ", x.size(-1), " features, w ",
              w.size(-1));
}

// y [H, M, N] (strided) = x[:, h] @ w[h]^T for every head h, split over (head, row block).
void run(const float* x, int64_t x_h, int64_t ldx, const uint16_t* w, int64_t w_h, int64_t ldw,
         float* y, int64_t y_h, int64_t ldy, int64_t heads, int64_t m, int64_t n, int64_t k) {
  const int64_t blocks = (n + kBlockRows - 1) / kBlockRows;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, kBlockRows * k * m));
  at::parallel_for(0, heads * blocks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t h = t / blocks, n0 = (t % blocks) * kBlockRows;
      Operands o{x + h * x_h, ldx, w + h * w_h, ldw, y + h * y_h, ldy, k};
      block(o, m, n0, std::min(n, n0 + kBlockRows));
    }
  });
}

const uint16_t* bits(const torch::Tensor& w) {
  return reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
}

}  // namespace

void check_out(const torch::Tensor& y, at::IntArrayRef shape) {
  TORCH_CHECK(y.scalar_type() == torch::kFloat32 && y.device().is_cpu() && y.is_contiguous(),
              "bf16_gemm: out must be a contiguous float32 CPU tensor");
  TORCH_CHECK(y.sizes() == shape, "bf16_gemm: out has shape ", y.sizes(), ", expected ", shape);
}

// x [M, K] fp32 (rows may be strided), w [N, K] bf16 -> out [M, N] fp32.
void linear(torch::Tensor x, torch::Tensor w, torch::Tensor out) {
  check(x, w, 2);
  const int64_t m = x.size(0), n = w.size(0), k = x.size(1);
  check_out(out, {m, n});
  if (m == 0 || n == 0) return;
  run(x.data_ptr<float>(), 0, x.stride(0), bits(w), 0, w.stride(0), out.data_ptr<float>(), 0, n,
      1, m, n, k);
}

// x [M, H, K] fp32, w [H, N, K] bf16 -> out [M, H, N] fp32: one linear per head.
void head_linear(torch::Tensor x, torch::Tensor w, torch::Tensor out) {
  check(x, w, 3);
  TORCH_CHECK(x.size(1) == w.size(0), "bf16_gemm: x has ", x.size(1), " heads, w ", w.size(0));
  const int64_t m = x.size(0), h = x.size(1), n = w.size(1), k = x.size(2);
  check_out(out, {m, h, n});
  if (m == 0 || n == 0 || h == 0) return;
  run(x.data_ptr<float>(), x.stride(1), x.stride(0), bits(w), w.stride(0), w.stride(1),
      out.data_ptr<float>(), n, h * n, h, m, n, k);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear", &linear, "out [M, N] fp32 = x [M, K] fp32 @ w [N, K] bf16 ^T");
  m.def("head_linear", &head_linear, "out [M, H, N] fp32 = x[:, h] @ w[h]^T per head h");
}
