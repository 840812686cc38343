// One MoE layer's routed experts over bf16-resident (or fp32) stacks, fp32 compute:
//   out[t] = sum_j weights[t, j] * down_e @ (silu(gate_e @ x[t]) * (up_e @ x[t])),  e = ids[t, j]
// with gate_up [E, 2I, D] (gate rows then up rows) and down [E, D, I]. Assignments are grouped by
// expert (a counting sort, stable), and each active expert runs two GEMMs over its rows: the whole
// layer in one call instead of ~10 torch ops per expert. Twin: LocalExperts' grouped torch path.

#include <vector>

#include "ops.h"

namespace k2 {

void routed_experts(const at::Tensor& x, const at::Tensor& ids, const at::Tensor& weights,
                    const at::Tensor& gate_up, const at::Tensor& down, at::Tensor& out) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous(),
              "routed_experts: x must be a contiguous [T, D] float32 tensor");
  const auto held = gate_up.scalar_type();
  TORCH_CHECK((held == at::kBFloat16 || held == at::kFloat) && down.scalar_type() == held &&
                  gate_up.is_contiguous() && down.is_contiguous() && gate_up.dim() == 3 &&
                  down.dim() == 3,
              "routed_experts: gate_up and down must be contiguous 3-d stacks, both bfloat16 or "
              "both float32");
  const int64_t t = x.size(0), d = x.size(1), e = gate_up.size(0), inter = down.size(2);
  TORCH_CHECK(gate_up.size(1) == 2 * inter && gate_up.size(2) == d && down.size(0) == e &&
                  down.size(1) == d,
              "routed_experts: gate_up ", gate_up.sizes(), " and down ", down.sizes(),
              " do not fit rows of width ", d);
  TORCH_CHECK(ids.scalar_type() == at::kLong && ids.dim() == 2 && ids.size(0) == t &&
                  ids.is_contiguous(),
              "routed_experts: ids must be a contiguous [T, k] int64 tensor");
  TORCH_CHECK(weights.scalar_type() == at::kFloat && weights.sizes() == ids.sizes() &&
                  weights.is_contiguous(),
              "routed_experts: weights must be a contiguous float32 tensor shaped like ids");
  check_out(out, {t, d});
  const int64_t pairs = ids.numel();
  const int64_t* id = ids.data_ptr<int64_t>();
  std::vector<int64_t> start(e + 1, 0), order(pairs);
  for (int64_t a = 0; a < pairs; ++a) {
    TORCH_CHECK(id[a] >= 0 && id[a] < e, "routed_experts: expert id ", id[a], " outside [0, ", e,
                ")");
    ++start[id[a] + 1];
  }
  for (int64_t i = 0; i < e; ++i) start[i + 1] += start[i];
  std::vector<int64_t> fill(start.begin(), start.end() - 1);
  for (int64_t a = 0; a < pairs; ++a) order[fill[id[a]]++] = a;

  const int64_t k = ids.size(1), i2 = 2 * inter;
  const float* xp = x.data_ptr<float>();
  const float* wp = weights.data_ptr<float>();
  std::vector<int64_t> active, position(pairs);  // experts with rows; sorted row of assignment a
  for (int64_t ex = 0; ex < e; ++ex)
    if (start[ex + 1] > start[ex]) active.push_back(ex);
  for (int64_t i = 0; i < pairs; ++i) position[order[i]] = i;

  // Sorted rows, hidden [pairs, 2I], activations [pairs, I] and outputs [pairs, D]; each GEMM
  // phase is one parallel region over (active expert, block of weight rows), so every thread
  // streams weights at batch 1 and the work stays balanced however the tokens are routed.
  std::vector<float> rows(pairs * d), hidden(pairs * i2), act(pairs * inter), y(pairs * d);
  at::parallel_for(0, pairs, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, d)),
                   [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      std::memcpy(rows.data() + i * d, xp + (order[i] / k) * d, d * sizeof(float));
  });
  const auto phase = [&]<typename W>(const W* stack, int64_t n_out, int64_t n_in, const float* in,
                                     float* out_rows) {
    const int64_t blocks = (n_out + kGemmBlock - 1) / kGemmBlock;
    const int64_t tasks = static_cast<int64_t>(active.size()) * blocks;
    at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t ex = active[task / blocks], n0 = (task % blocks) * kGemmBlock;
        const int64_t first = start[ex], n = start[ex + 1] - first;
        gemm_rows<W>({in + first * n_in, n_in, 0, stack + ex * n_out * n_in, n_in, 0,
                      out_rows + first * n_out, n_out, 0, 1, n, n_out, n_in},
                     n0, std::min(n_out, n0 + kGemmBlock));
      }
    });
  };
  if (held == at::kBFloat16) {
    phase(bf16_bits(gate_up), i2, d, rows.data(), hidden.data());
  } else {
    phase(gate_up.data_ptr<float>(), i2, d, rows.data(), hidden.data());
  }
  at::parallel_for(0, pairs, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, inter)),
                   [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      silu_mul(hidden.data() + i * i2, hidden.data() + i * i2 + inter, act.data() + i * inter,
               inter);
  });
  if (held == at::kBFloat16) {
    phase(bf16_bits(down), d, inter, act.data(), y.data());
  } else {
    phase(down.data_ptr<float>(), d, inter, act.data(), y.data());
  }
  float* op = out.data_ptr<float>();
  at::parallel_for(0, t, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, k * d)),
                   [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      float* o = op + row * d;
      std::fill(o, o + d, 0.0f);
      for (int64_t j = 0; j < k; ++j)
        axpy(wp[row * k + j], y.data() + position[row * k + j] * d, o, d);
    }
  });
}

}  // namespace k2
