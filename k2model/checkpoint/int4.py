"""INT4 routed experts: compressed-tensors `pack-quantized`, symmetric, group 32 (K2-Thinking,
K2.5, K2.6; docs/checkpoint.md, INT4).

Per routed-expert projection the checkpoint holds `weight_packed` int32 [out, in/8] (eight 4-bit
values per int32 along the input dimension, least significant nibble first), `weight_scale`
[out, in/32] (bf16) and `weight_shape` int32 [2]. Nibbles are offset binary: q = nibble - 8, q in
[-8, 7], and w = q * scale of its group (vLLM and SGLang read them as `uint4b8`; a two's-complement
reading is wrong). `tests/checkpoint/test_int4.py` checks this packing against the
compressed-tensors library itself. The weights stay packed in memory (a quarter of bf16's bytes);
`dequantize_int4` is the twin every INT4 path is tested against.
"""

from __future__ import annotations

import re

import torch

from k2model.quant_config import GROUP

PACKED, SCALE, SHAPE = "weight_packed", "weight_scale", "weight_shape"
# K2-Thinking's quantization_config (docs/checkpoint.md, INT4): every Linear is INT4 except
# attention, the shared expert, layer 0's dense MLP and lm_head (the router is not a Linear).
K2_THINKING_QUANTIZATION = {
    "quant_method": "compressed-tensors",
    "format": "pack-quantized",
    "quantization_status": "compressed",
    "config_groups": {
        "group_0": {
            "targets": ["Linear"],
            "weights": {
                "num_bits": 4,
                "type": "int",
                "symmetric": True,
                "strategy": "group",
                "group_size": GROUP,
                "dynamic": False,
                "observer": "minmax",
                "actorder": None,
                "block_structure": None,
            },
            "input_activations": None,
            "output_activations": None,
        }
    },
    "ignore": [
        "re:.*self_attn.*",
        "re:.*shared_experts.*",
        "re:.*mlp\\.(gate|up|gate_up|down)_proj.*",
        "re:.*lm_head.*",
    ],
    "kv_cache_scheme": None,
}
# The weights that ignore list leaves quantised: the routed experts' projections.
_INT4_WEIGHT = re.compile(
    r"(language_model\.)?model\.layers\.\d+\.mlp\.experts\.\d+\.(gate|up|down)_proj\.weight"
)


def is_int4_weight_name(name: str) -> bool:
    return _INT4_WEIGHT.fullmatch(name) is not None


_NIBBLES = torch.arange(8, dtype=torch.int32) * 4


def unpack_int4(packed: torch.Tensor, columns: int) -> torch.Tensor:
    """int32 [..., columns/8] -> int8 q [..., columns] in [-8, 7]."""
    nibbles = (packed.unsqueeze(-1) >> _NIBBLES.to(packed.device)) & 0xF
    return (nibbles.flatten(-2)[..., :columns] - 8).to(torch.int8)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 q [..., columns] in [-8, 7] (columns a multiple of 8) -> int32 [..., columns/8]."""
    nibbles = (q.to(torch.int32) + 8).unflatten(-1, (-1, 8))
    return (nibbles << _NIBBLES.to(q.device)).sum(-1, dtype=torch.int64).to(torch.int32)


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[..., out, in/8] packed, [..., out, in/32] scales -> [..., out, in] in `dtype`."""
    columns = packed.shape[-1] * 8
    q = unpack_int4(packed, columns).to(torch.float32)
    groups = q.unflatten(-1, (-1, GROUP)) * scale.to(torch.float32).unsqueeze(-1)
    return groups.flatten(-2).to(dtype)


def quantize_int4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric group-32 quantisation (for tests and tiny checkpoints): (packed, bf16 scale)."""
    groups = w.float().unflatten(-1, (-1, GROUP))
    scale = (groups.abs().amax(-1) / 7.0).clamp(min=1e-8).bfloat16()
    q = (groups / scale.float().unsqueeze(-1)).round().clamp(-8, 7).to(torch.int8).flatten(-2)
    return pack_int4(q), scale
