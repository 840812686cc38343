"""Kernel tests run the compiled kernels on CUDA and Triton's interpreter on CPU tensors elsewhere.

The interpreter is chosen before any kernel file is imported, in tests/conftest.py (Triton reads
TRITON_INTERPRET when a kernel is decorated). Every test draws fresh inputs: the seed is random and printed, so a failure
can be replayed with KERNEL_TEST_SEED.
"""

import os
import random

import pytest
import torch


@pytest.fixture(autouse=True)
def fresh_seed() -> int:
    seed = int(os.environ.get("KERNEL_TEST_SEED") or random.SystemRandom().randrange(2**31))
    print(f"KERNEL_TEST_SEED={seed}")
    torch.manual_seed(seed)
    return seed
