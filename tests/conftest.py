"""Set before any test module is collected: on a machine without CUDA, Triton kernels run in
Triton's interpreter on CPU tensors. Triton reads TRITON_INTERPRET when a kernel is decorated,
and libraries imported while collecting (compressed-tensors imports triton) must not decorate
first under another setting."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
