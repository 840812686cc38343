"""The routed-expert forward from the Triton kernels: align, SwiGLU grouped GEMM, down grouped GEMM.

sum_j weights[t, j] * down_e(silu(gate_e(x_t)) * up_e(x_t)) with e = ids[t, j], the contract of
`k2model.moe.RoutedExperts`. With fp8 experts the activations are quantised per token and 128
channels before each GEMM (act_quant), as DeepSeek-V3 serves its block-fp8 weights; INT4 experts
run W4A16 (int4_gemm.py), activations unquantised. `fused_moe_ref` is the same math in plain
torch (activation quantisation included).
"""

import torch

from k2model.kernels.act_quant import act_quant, act_quant_ref
from k2model.kernels.dispatch import ExpertWeights
from k2model.kernels.grouped_gemm import grouped_gemm, grouped_gemm_ref
from k2model.kernels.int4_gemm import int4_grouped_gemm
from k2model.kernels.moe_align import moe_align


def block_m_for(n_assign: int, n_experts: int) -> int:
    """Rows per block of an expert's run: about the mean rows per expert, at least 16 (the
    smallest tensor-core tile). Padding wastes at most block_m - 1 rows per active expert."""
    mean = n_assign / n_experts
    return 16 if mean <= 16 else 32 if mean <= 32 else 64


def fused_moe(
    x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, w: ExpertWeights
) -> torch.Tensor:
    """x [T, D], ids [T, k], weights [T, k] -> [T, D] in x.dtype, with the Triton kernels."""
    t, k = ids.shape
    n_assign, n_exp = t * k, w.gate.shape[0]
    bm = block_m_for(n_assign, n_exp)
    layout = (*moe_align(ids, n_exp, bm), n_assign)
    row_w = weights.reshape(-1).float()
    if w.int4:  # W4A16: the words unpacked in registers, activations as they are
        h = int4_grouped_gemm(x, w.gate, w.gate_scale, *layout, k, x.dtype, bm, w.up, w.up_scale)
        y = int4_grouped_gemm(
            h, w.down, w.down_scale, *layout, 1, torch.float32, bm, row_weight=row_w
        )
    elif w.fp8:
        xq, xs = act_quant(x)
        h = grouped_gemm(xq, w.gate, *layout, k, x.dtype, bm, w.up, xs, w.gate_scale, w.up_scale)
        hq, hs = act_quant(h)
        y = grouped_gemm(
            hq, w.down, *layout, 1, torch.float32, bm, None, hs, w.down_scale, row_weight=row_w
        )
    else:
        h = grouped_gemm(x, w.gate, *layout, k, x.dtype, bm, w.up)
        y = grouped_gemm(h, w.down, *layout, 1, torch.float32, bm, row_weight=row_w)
    return y.view(t, k, -1).sum(1).to(x.dtype)


def _quantised(x: torch.Tensor, fp8: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    return act_quant_ref(x) if fp8 else (x, None)


def fused_moe_ref(
    x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, w: ExpertWeights
) -> torch.Tensor:
    t, k = ids.shape
    flat, row_w = ids.reshape(-1), weights.reshape(-1)
    xq, xs = _quantised(x, w.fp8)
    h = grouped_gemm_ref(xq, w.gate, flat, k, x.dtype, w.up, xs, w.gate_scale, w.up_scale)
    hq, hs = _quantised(h, w.fp8)
    y = grouped_gemm_ref(hq, w.down, flat, 1, torch.float32, None, hs, w.down_scale, None, row_w)
    return y.view(t, k, -1).sum(1).to(x.dtype)
