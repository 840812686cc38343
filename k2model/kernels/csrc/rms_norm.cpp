// RMSNorm of fp32 rows in one pass each: out = weight * (x / sqrt(mean(x^2) + eps)).
// Twin: layers.RMSNorm's torch expression (which dispatches six ops per call).

#include <cmath>

#include "ops.h"

namespace k2 {

void rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps, at::Tensor& out) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.stride(1) == 1,
              "rms_norm: x must be [T, D] float32 with contiguous rows");
  const int64_t t = x.size(0), d = x.size(1), ldx = x.stride(0);
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.dim() == 1 && weight.size(0) == d &&
                  weight.is_contiguous(),
              "rms_norm: weight must be a contiguous [D] float32 tensor");
  check_out(out, {t, d});
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, t, std::max<int64_t>(1, 65536 / std::max<int64_t>(1, d)),
                   [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float* row = xp + i * ldx;
      const float inv = 1.0f / std::sqrt(dot(row, row, d) / static_cast<float>(d) +
                                         static_cast<float>(eps));
      float* o = op + i * d;
      for (int64_t j = 0; j < d; ++j) o[j] = wp[j] * (row[j] * inv);
    }
  });
}

}  // namespace k2
