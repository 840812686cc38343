"""k2model's C++ CPU extension (csrc/): the ops that take the CPU decode step off the BLAS and
off per-op dispatch, each with a plain-torch twin at its call site.

- bf16_gemm.cpp: fp32 activations x bf16-resident weights (bf16_weights.py)
- routed_experts.cpp: one MoE layer's routed experts in one call (moe.LocalExperts)
- rms_norm.cpp: RMSNorm in one pass per row (layers.RMSNorm)
- mla_decode.cpp: absorbed MLA decode attention off the paged cache (dispatch.mla_decode)

Built with AVX2/FMA intrinsics by torch's extension builder (~1 minute on two cores) into a
folder of TORCH_EXTENSIONS_DIR named by the sources' content (ext_build.py: the same build
serves every checkout, a killed build never blocks the next). `k2serve build` builds it ahead of
serving (`make up` and the images run it); otherwise the first use does. Without an AVX2 CPU or
a C++ compiler `available()` is False (`unavailable_reason()` says why): the "cpu" ops backend
(kernels/ops.py) then cannot be chosen, and "auto" takes "torch".
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from types import ModuleType

import torch

from k2model.kernels.ext_build import build

log = logging.getLogger(__name__)

_CSRC = Path(__file__).with_name("csrc")
SOURCES = ("bf16_gemm.cpp", "routed_experts.cpp", "rms_norm.cpp", "mla_decode.cpp", "bindings.cpp")


NAME = "k2_cpu_ops"
# OpenMP: at::parallel_for is inlined here, and runs on torch's own libgomp threads.
CFLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp")
LDFLAGS = ("-fopenmp",)


def build_args() -> tuple[str, list[Path], list[Path], tuple[str, ...], tuple[str, ...]]:
    """(name, sources, headers, cflags, ldflags) of the extension, as ext_build takes them."""
    return NAME, [_CSRC / s for s in SOURCES], sorted(_CSRC.glob("*.h")), CFLAGS, LDFLAGS


@functools.cache
def _built() -> tuple[ModuleType | None, str]:
    """(the compiled module, "") or (None, why not)."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "AVX512"):
        return None, f"the CPU has no AVX2 (torch reports {capability})"
    try:
        return build(*build_args()), ""
    except Exception as e:  # no compiler or headers
        log.warning("k2model CPU extension unavailable: %s", e)
        return None, f"the build failed: {e}"


def extension() -> ModuleType | None:
    """The compiled module, or None where it cannot be had."""
    return _built()[0]


def unavailable_reason() -> str:
    return _built()[1]


def available() -> bool:
    return extension() is not None


def takes(x: torch.Tensor) -> bool:
    """Whether the CPU ops apply to activations x: fp32 on the CPU, with the extension built."""
    return x.dtype == torch.float32 and x.device.type == "cpu" and available()
