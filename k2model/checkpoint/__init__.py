"""Checkpoint files: sharded safetensors directories, K2 block-fp8 weights and the quantiser.

`shards` reads and writes HF checkpoint directories (index + shards, or one file); `fp8` holds
the block-fp8 math; `quantize` turns a bf16/fp32 checkpoint into K2's fp8 format (import it from
`k2model.checkpoint.quantize`: re-exporting it here would make `python -m` import it twice). The
loader (`loader.py`) maps HF names onto the model on top of these.
"""

from k2model.checkpoint.fp8 import (
    BLOCK,
    act_dequant_fp8,
    act_quant_fp8,
    dequantize_block_fp8,
    is_quantized_weight_name,
    quantize_block_fp8,
)
from k2model.checkpoint.shards import (
    INDEX_NAME,
    SINGLE_NAME,
    CheckpointError,
    ShardedCheckpoint,
    ShardWriter,
    TensorInfo,
    write_sharded,
)

__all__ = [
    "BLOCK",
    "INDEX_NAME",
    "SINGLE_NAME",
    "CheckpointError",
    "ShardWriter",
    "ShardedCheckpoint",
    "TensorInfo",
    "act_dequant_fp8",
    "act_quant_fp8",
    "dequantize_block_fp8",
    "is_quantized_weight_name",
    "quantize_block_fp8",
    "write_sharded",
]
