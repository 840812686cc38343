"""GPU kernels (Triton), one file each with its launcher and plain-torch reference (STYLE item 9).

- act_quant.py: per-token, per-128-channel fp8 activation quantisation
- fp8_gemm.py: block-fp8 GEMM (fp8 activations x 128x128-block fp8 weights, fp32 accumulation)
- mla_decode.py: absorbed MLA decode attention over the paged latent cache, split over the sequence
- moe_align.py: routed assignments sorted by expert and padded to whole row blocks
- grouped_gemm.py: one GEMM over the row blocks of every selected expert (bf16 or fp8, SwiGLU fused)
- fused_moe.py: the routed-expert forward composed from the three kernels above
- dispatch.py: what the model calls; Triton on CUDA tensors, the torch references elsewhere

Triton is optional: only dispatch.py is imported by the model, and it imports the kernel files on
first use with a CUDA tensor, so CPU-only installs never import Triton.
"""
