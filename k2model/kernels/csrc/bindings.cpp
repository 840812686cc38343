// The Python module of k2model's CPU extension (loaded by k2model/kernels/cpu_ext.py). Every op
// releases the GIL, as torch's own ops do: a service's event loop keeps streaming while its model
// step runs on a worker thread.
#include <torch/extension.h>

#include "ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  const auto nogil = pybind11::call_guard<pybind11::gil_scoped_release>();
  m.def("linear", &k2::linear, "out [M, N] fp32 = x [M, K] fp32 @ w [N, K] bf16 ^T", nogil);
  m.def("head_linear", &k2::head_linear, "out [M, H, N] fp32 = x[:, h] @ w[h]^T per head h",
        nogil);
  m.def("routed_experts", &k2::routed_experts,
        "out [T, D] = routed experts (bf16 gate_up [E, 2I, D], down [E, D, I]) of x [T, D]", nogil);
  m.def("routed_experts_int4", &k2::routed_experts_int4,
        "out [T, D] = routed experts of x [T, D] over INT4 stacks (int32 words, bf16 scales)",
        nogil);
  m.def("rms_norm", &k2::rms_norm, "out [T, D] = weight * x / rms(x), fp32", nogil);
  m.def("mla_decode", &k2::mla_decode,
        "out [B, H, r] = absorbed MLA decode attention of q [B, H, r + d_r] over paged kv", nogil);
}
