// One MoE layer's routed experts, fp32 compute:
//   out[t] = sum_j weights[t, j] * down_e @ (silu(gate_e @ x[t]) * (up_e @ x[t])),  e = ids[t, j]
// with gate_up [E, 2I, D] (gate rows then up rows) and down [E, D, I], held in bf16 or fp32
// (`routed_experts`) or as INT4 (`routed_experts_int4`: int32 words of eight 4-bit values along
// the input dimension, least significant first, q = nibble - 8, one bf16 scale per 32 inputs;
// k2model/checkpoint/int4.py). Assignments are grouped by expert (a counting sort, stable), and
// each active expert runs two GEMMs over its rows: the whole layer in one call instead of ~10
// torch ops per expert. INT4 weights are never widened outside a task's block of rows. Twin: LocalExperts' grouped torch path (which dequantises INT4 first).

#include <algorithm>
#include <functional>
#include <vector>

#include "ops.h"

namespace k2 {
namespace {

// y rows [first, first + n) x weight rows [n0, n1) of expert ex, for inputs `in` of width n_in.
using ExpertRows = std::function<void(int64_t ex, int64_t first, int64_t n, const float* in,
                                      int64_t n_in, float* y, int64_t n_out, int64_t n0,
                                      int64_t n1)>;

void check_routing(const at::Tensor& x, const at::Tensor& ids, const at::Tensor& weights,
                   at::Tensor& out) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous(),
              "routed_experts: x must be a contiguous [T, D] float32 tensor");
  TORCH_CHECK(ids.scalar_type() == at::kLong && ids.dim() == 2 && ids.size(0) == x.size(0) &&
                  ids.is_contiguous(),
              "routed_experts: ids must be a contiguous [T, k] int64 tensor");
  TORCH_CHECK(weights.scalar_type() == at::kFloat && weights.sizes() == ids.sizes() &&
                  weights.is_contiguous(),
              "routed_experts: weights must be a contiguous float32 tensor shaped like ids");
  check_out(out, {x.size(0), x.size(1)});
}

void routed(const at::Tensor& x, const at::Tensor& ids, const at::Tensor& weights, int64_t e,
            int64_t inter, const ExpertRows& gate_up, const ExpertRows& down, at::Tensor& out) {
  const int64_t t = x.size(0), d = x.size(1);
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
  const auto phase = [&](const ExpertRows& run, int64_t n_out, int64_t n_in, const float* in,
                         float* out_rows) {
    const int64_t blocks = (n_out + kGemmBlock - 1) / kGemmBlock;
    const int64_t tasks = static_cast<int64_t>(active.size()) * blocks;
    at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t ex = active[task / blocks], n0 = (task % blocks) * kGemmBlock;
        run(ex, start[ex], start[ex + 1] - start[ex], in, n_in, out_rows, n_out, n0,
            std::min(n_out, n0 + kGemmBlock));
      }
    });
  };
  phase(gate_up, i2, d, rows.data(), hidden.data());
  at::parallel_for(0, pairs, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, inter)),
                   [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      silu_mul(hidden.data() + i * i2, hidden.data() + i * i2 + inter, act.data() + i * inter,
               inter);
  });
  phase(down, d, inter, act.data(), y.data());
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

template <typename W>
ExpertRows dense_rows(const W* stack) {
  return [stack](int64_t ex, int64_t first, int64_t n, const float* in, int64_t n_in, float* y,
                 int64_t n_out, int64_t n0, int64_t n1) {
    gemm_rows<W>({in + first * n_in, n_in, 0, stack + ex * n_out * n_in, n_in, 0,
                  y + first * n_out, n_out, 0, 1, n, n_out, n_in},
                 n0, n1);
  };
}

// An input row for INT4 dots: each block of 16 values reordered evens then odds (the order
// the nibbles of 8 packed bytes come out in: byte j holds elements 2j and 2j + 1), and the sum
// of each group of 32 (q = nibble - 8, so q . x = nibble . x - 8 * sum(x)).
inline void prepare_int4_input(const float* x, int64_t n_in, float* xp, float* sums) {
  for (int64_t b = 0; b < n_in; b += 16)
    for (int j = 0; j < 8; ++j) {
      xp[b + j] = x[b + 2 * j];
      xp[b + 8 + j] = x[b + 2 * j + 1];
    }
  for (int64_t g = 0; g < n_in / 32; ++g) {
    float s = 0.0f;
    for (int j = 0; j < 32; ++j) s += x[g * 32 + j];
    sums[g] = s;
  }
}

// One INT4 weight row (packed bytes, bf16 scales) . a prepared input row, fp32.
inline float dot_int4(const uint8_t* bytes, const uint16_t* scale, const float* xp,
                      const float* sums, int64_t n_in) {
  const __m256i low4 = _mm256_set1_epi32(0xF);
  __m256 acc = _mm256_setzero_ps();
  float offset = 0.0f;
  for (int64_t g = 0; g < n_in / 32; ++g) {
    __m256 part = _mm256_setzero_ps();
    for (int h = 0; h < 2; ++h) {
      const __m256i v = _mm256_cvtepu8_epi32(
          _mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes + g * 16 + h * 8)));
      const float* xb = xp + g * 32 + h * 16;
      part = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v, low4)),
                             _mm256_loadu_ps(xb), part);
      part = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4)),
                             _mm256_loadu_ps(xb + 8), part);
    }
    const float s = bf16_to_float(scale[g]);
    acc = _mm256_fmadd_ps(part, _mm256_set1_ps(s), acc);
    offset += 8.0f * sums[g] * s;
  }
  return hsum(acc) - offset;
}

// One INT4 weight row widened to fp32: w[i] = (nibble_i - 8) * scale[i / 32], exact. Byte j
// holds elements 2j (low nibble) and 2j + 1 (high): 8 bytes give lows and highs as two vectors,
// interleaved back into element order within and then across the 128-bit lanes.
inline void widen_int4_row(const uint8_t* bytes, const uint16_t* scale, float* w, int64_t n_in) {
  const __m256i low4 = _mm256_set1_epi32(0xF);
  const __m256 eight = _mm256_set1_ps(8.0f);
  for (int64_t g = 0; g < n_in / 32; ++g) {
    const __m256 s = _mm256_set1_ps(bf16_to_float(scale[g]));
    for (int h = 0; h < 2; ++h) {
      const __m256i v = _mm256_cvtepu8_epi32(
          _mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes + g * 16 + h * 8)));
      const __m256i lo = _mm256_and_si256(v, low4), hi = _mm256_srli_epi32(v, 4);
      const __m256i a = _mm256_unpacklo_epi32(lo, hi), b = _mm256_unpackhi_epi32(lo, hi);
      float* out = w + g * 32 + h * 16;
      for (int half = 0; half < 2; ++half) {
        const __m256i q = _mm256_permute2x128_si256(a, b, half ? 0x31 : 0x20);
        _mm256_storeu_ps(out + 8 * half,
                         _mm256_mul_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(q), eight), s));
      }
    }
  }
}

// From this many rows of one expert on, its block of weight rows is widened once to fp32 and
// multiplied by the tiled GEMM (each weight vector loaded once per 6 rows); below it, each row
// is dotted straight from the packed bytes (bench/int4_experts.py measured the crossover).
constexpr int64_t kWidenRows = 8;
constexpr int64_t kWidenBlock = 8;  // weight rows widened per GEMM call

ExpertRows int4_rows(const int32_t* packed, const uint16_t* scale) {
  return [packed, scale](int64_t ex, int64_t first, int64_t n, const float* in, int64_t n_in,
                         float* y, int64_t n_out, int64_t n0, int64_t n1) {
    const auto* bytes = reinterpret_cast<const uint8_t*>(packed);
    if (n >= kWidenRows) {
      std::vector<float> w(kWidenBlock * n_in);  // a few weight rows at a time: stays in L2
      for (int64_t r0 = n0; r0 < n1; r0 += kWidenBlock) {
        const int64_t rows = std::min(kWidenBlock, n1 - r0);
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t at = ex * n_out + r0 + r;
          widen_int4_row(bytes + at * (n_in / 2), scale + at * (n_in / 32),
                         w.data() + r * n_in, n_in);
        }
        gemm_rows<float>({in + first * n_in, n_in, 0, w.data(), n_in, 0,
                          y + first * n_out + r0, n_out, 0, 1, n, rows, n_in},
                         0, rows);
      }
      return;
    }
    std::vector<float> xp(n * n_in), sums(n * (n_in / 32));
    for (int64_t m = 0; m < n; ++m)
      prepare_int4_input(in + (first + m) * n_in, n_in, xp.data() + m * n_in,
                         sums.data() + m * (n_in / 32));
    for (int64_t r = n0; r < n1; ++r) {  // a weight row stays in cache across the expert's rows
      const int64_t at = ex * n_out + r;
      for (int64_t m = 0; m < n; ++m)
        y[(first + m) * n_out + r] =
            dot_int4(bytes + at * (n_in / 2), scale + at * (n_in / 32), xp.data() + m * n_in,
                     sums.data() + m * (n_in / 32), n_in);
    }
  };
}

}  // namespace

void routed_experts(const at::Tensor& x, const at::Tensor& ids, const at::Tensor& weights,
                    const at::Tensor& gate_up, const at::Tensor& down, at::Tensor& out) {
  check_routing(x, ids, weights, out);
  const auto held = gate_up.scalar_type();
  TORCH_CHECK((held == at::kBFloat16 || held == at::kFloat) && down.scalar_type() == held &&
                  gate_up.is_contiguous() && down.is_contiguous() && gate_up.dim() == 3 &&
                  down.dim() == 3,
              "routed_experts: gate_up and down must be contiguous 3-d stacks, both bfloat16 or "
              "both float32");
  const int64_t d = x.size(1), e = gate_up.size(0), inter = down.size(2);
  TORCH_CHECK(gate_up.size(1) == 2 * inter && gate_up.size(2) == d && down.size(0) == e &&
                  down.size(1) == d,
              "routed_experts: gate_up ", gate_up.sizes(), " and down ", down.sizes(),
              " do not fit rows of width ", d);
  if (held == at::kBFloat16) {
    routed(x, ids, weights, e, inter, dense_rows(bf16_bits(gate_up)), dense_rows(bf16_bits(down)),
           out);
  } else {
    routed(x, ids, weights, e, inter, dense_rows(gate_up.data_ptr<float>()),
           dense_rows(down.data_ptr<float>()), out);
  }
}

void routed_experts_int4(const at::Tensor& x, const at::Tensor& ids, const at::Tensor& weights,
                         const at::Tensor& gate_up, const at::Tensor& gate_up_scale,
                         const at::Tensor& down, const at::Tensor& down_scale, at::Tensor& out) {
  check_routing(x, ids, weights, out);
  const int64_t d = x.size(1), e = gate_up.size(0), inter = down.size(2) * 8;
  for (const at::Tensor* p : {&gate_up, &down})
    TORCH_CHECK(p->scalar_type() == at::kInt && p->dim() == 3 && p->is_contiguous(),
                "routed_experts_int4: packed stacks must be contiguous 3-d int32");
  for (const at::Tensor* s : {&gate_up_scale, &down_scale})
    TORCH_CHECK(s->scalar_type() == at::kBFloat16 && s->dim() == 3 && s->is_contiguous(),
                "routed_experts_int4: scales must be contiguous 3-d bfloat16");
  TORCH_CHECK(d % 32 == 0 && inter % 32 == 0 && gate_up.size(1) == 2 * inter &&
                  gate_up.size(2) * 8 == d && down.size(0) == e && down.size(1) == d &&
                  gate_up_scale.sizes() == at::IntArrayRef({e, 2 * inter, d / 32}) &&
                  down_scale.sizes() == at::IntArrayRef({e, d, inter / 32}),
              "routed_experts_int4: stacks ", gate_up.sizes(), ", ", down.sizes(),
              " and scales do not fit rows of width ", d, " in groups of 32");
  const auto* gu = reinterpret_cast<const int32_t*>(gate_up.data_ptr<int32_t>());
  const auto* dn = reinterpret_cast<const int32_t*>(down.data_ptr<int32_t>());
  routed(x, ids, weights, e, inter, int4_rows(gu, bf16_bits(gate_up_scale)),
         int4_rows(dn, bf16_bits(down_scale)), out);
}

}  // namespace k2
