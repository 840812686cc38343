"""GPU kernels (Triton), one file each with its launcher and plain-torch reference (STYLE item 9).

- act_quant.py: per-token, per-128-channel fp8 activation quantisation
- fp8_gemm.py: block-fp8 GEMM (fp8 activations x 128x128-block fp8 weights, fp32 accumulation)
- mla_decode.py: absorbed MLA decode attention over the paged latent cache, split over the sequence
- moe_align.py: routed assignments sorted by expert and padded to whole row blocks
- grouped_gemm.py: one GEMM over the row blocks of every selected expert (bf16 or fp8, SwiGLU fused)
- fused_moe.py: the routed-expert forward composed from the three kernels above
- dispatch.py: the shapes the kernels share (stacked experts, fp8 parts) and the fp8 linear glue
- ops.py: the ops backend a model is loaded with (torch twins, the C++ extension, or these
  kernels), chosen once; the layers call it

Triton is optional: the kernel files are imported on first use by the triton backend, so a
model on the torch or cpu backend never imports Triton.
"""
