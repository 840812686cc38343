// fp32 activations times bf16-resident weights, accumulating in fp32: y = x @ float(w)^T.
//
// Widening bf16 to fp32 is exact, so this is the fp32 product of the activations with the
// checkpoint's own weights while reading half the bytes; CPU decode is bound by those reads.
// Work is split over blocks of output features; within a block, tiles of up to 6 activation rows
// x 2 weight rows keep 12 accumulators in registers, each weight vector loaded once per tile and
// each activation vector once per pair of weight rows. Twin: F.linear(x, w.float()). The same
// code serves fp32 weights (routed_experts.cpp, for fp32 and dequantised-fp8 checkpoints).

#include <algorithm>

#include "ops.h"

namespace k2 {
namespace {

inline __m256 load8(const uint16_t* p) { return load_bf16x8(p); }
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline float widen(uint16_t v) { return bf16_to_float(v); }
inline float widen(float v) { return v; }

// Activation rows x[m] (ldx apart) against weight rows w[n] (ldw apart), y[m, n] at y + m * ldy + n.
template <typename W>
struct Tile {
  const float* x;
  int64_t ldx;
  const W* w;
  int64_t ldw;
  float* y;
  int64_t ldy, k;
};

template <int MB, int NB, typename W>
inline void tile(const Tile<W>& o, int64_t m0, int64_t n) {
  __m256 acc[MB][NB];
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NB; ++j) acc[i][j] = _mm256_setzero_ps();
  const int64_t k8 = o.k & ~int64_t{7};
  for (int64_t k = 0; k < k8; k += 8) {
    __m256 wv[NB];
    for (int j = 0; j < NB; ++j) wv[j] = load8(o.w + (n + j) * o.ldw + k);
    for (int i = 0; i < MB; ++i) {
      __m256 xv = _mm256_loadu_ps(o.x + (m0 + i) * o.ldx + k);
      for (int j = 0; j < NB; ++j) acc[i][j] = _mm256_fmadd_ps(xv, wv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < MB; ++i) {
    for (int j = 0; j < NB; ++j) {
      float s = hsum(acc[i][j]);
      for (int64_t k = k8; k < o.k; ++k)
        s += o.x[(m0 + i) * o.ldx + k] * widen(o.w[(n + j) * o.ldw + k]);
      o.y[(m0 + i) * o.ldy + n + j] = s;
    }
  }
}

template <int MB, typename W>
inline void row_tile(const Tile<W>& o, int64_t m0, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + 2 <= n1; n += 2) tile<MB, 2>(o, m0, n);
  if (n < n1) tile<MB, 1>(o, m0, n);
}

// Every activation row against weight rows n0 .. n1 - 1.
template <typename W>
void block(const Tile<W>& o, int64_t m, int64_t n0, int64_t n1) {
  int64_t i = 0;
  for (; i + 6 <= m; i += 6) row_tile<6>(o, i, n0, n1);
  switch (m - i) {
    case 5: row_tile<5>(o, i, n0, n1); break;
    case 4: row_tile<4>(o, i, n0, n1); break;
    case 3: row_tile<3>(o, i, n0, n1); break;
    case 2: row_tile<2>(o, i, n0, n1); break;
    case 1: row_tile<1>(o, i, n0, n1); break;
    default: break;
  }
}

void check(const at::Tensor& x, const at::Tensor& w, int64_t dims) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "bf16_gemm: CPU tensors only");
  TORCH_CHECK(x.scalar_type() == at::kFloat, "bf16_gemm: x must be float32");
  TORCH_CHECK(w.scalar_type() == at::kBFloat16, "bf16_gemm: w must be bfloat16");
  TORCH_CHECK(x.dim() == dims && w.dim() == dims, "bf16_gemm: expected ", dims, "-d x and w");
  TORCH_CHECK(x.stride(-1) == 1 && w.stride(-1) == 1, "bf16_gemm: last dims must be contiguous");
  TORCH_CHECK(x.size(-1) == w.size(-1), "bf16_gemm: x has ", x.size(-1), " features, w ",
              w.size(-1));
}

}  // namespace

void check_out(const at::Tensor& out, at::IntArrayRef shape) {
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.device().is_cpu() && out.is_contiguous(),
              "out must be a contiguous float32 CPU tensor");
  TORCH_CHECK(out.sizes() == shape, "out has shape ", out.sizes(), ", expected ", shape);
}

template <typename W>
void gemm(const Gemm<W>& g) {
  if (g.heads == 0 || g.m == 0 || g.n == 0) return;
  const int64_t blocks = (g.n + kGemmBlock - 1) / kGemmBlock;
  const int64_t work = kGemmBlock * g.k * g.m;  // multiply-adds per task
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, work));
  at::parallel_for(0, g.heads * blocks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t h = t / blocks, n0 = (t % blocks) * kGemmBlock;
      Tile<W> o{g.x + h * g.x_h, g.ldx, g.w + h * g.w_h, g.ldw, g.y + h * g.y_h, g.ldy, g.k};
      block(o, g.m, n0, std::min(g.n, n0 + kGemmBlock));
    }
  });
}

template <typename W>
void gemm_rows(const Gemm<W>& g, int64_t n0, int64_t n1) {
  block(Tile<W>{g.x, g.ldx, g.w, g.ldw, g.y, g.ldy, g.k}, g.m, n0, n1);
}

template void gemm<uint16_t>(const Gemm<uint16_t>&);
template void gemm<float>(const Gemm<float>&);
template void gemm_rows<uint16_t>(const Gemm<uint16_t>&, int64_t, int64_t);
template void gemm_rows<float>(const Gemm<float>&, int64_t, int64_t);

// x [M, K] fp32 (rows may be strided), w [N, K] bf16 -> out [M, N].
void linear(const at::Tensor& x, const at::Tensor& w, at::Tensor& out) {
  check(x, w, 2);
  const int64_t m = x.size(0), n = w.size(0), k = x.size(1);
  check_out(out, {m, n});
  gemm<uint16_t>({x.data_ptr<float>(), x.stride(0), 0, bf16_bits(w), w.stride(0), 0,
                  out.data_ptr<float>(), n, 0, 1, m, n, k});
}

// x [M, H, K] fp32, w [H, N, K] bf16 -> out [M, H, N]: one linear per head.
void head_linear(const at::Tensor& x, const at::Tensor& w, at::Tensor& out) {
  check(x, w, 3);
  TORCH_CHECK(x.size(1) == w.size(0), "bf16_gemm: x has ", x.size(1), " heads, w ", w.size(0));
  const int64_t m = x.size(0), h = x.size(1), n = w.size(1), k = x.size(2);
  check_out(out, {m, h, n});
  gemm<uint16_t>({x.data_ptr<float>(), x.stride(0), x.stride(1), bf16_bits(w), w.stride(1),
                  w.stride(0), out.data_ptr<float>(), h * n, n, h, m, n, k});
}

}  // namespace k2
