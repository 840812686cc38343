"""Kimi K2 in PyTorch: config, model, checkpoint loading, sampling and in-process generation.

from k2model import load_model, generate_ids, EMBEDDED_CHECKPOINT
model = load_model(EMBEDDED_CHECKPOINT)          # or a real K2 checkpoint directory
print(generate_ids(model, [[1, 2, 3]], max_new_tokens=8))
"""

from pathlib import Path

from k2model.checkpoint.loader import default_dtype, load_model
from k2model.config import ConfigError, K2Config
from k2model.generate import GenerationRequest, TokenEvent, generate, generate_ids
from k2model.model import K2Model
from k2model.sampling import SampleResult, sample
from k2model.sampling_params import SamplingParams, SamplingRow

EMBEDDED_CHECKPOINT = Path(__file__).parent / "embedded"

__all__ = [
    "EMBEDDED_CHECKPOINT",
    "ConfigError",
    "GenerationRequest",
    "K2Config",
    "K2Model",
    "SampleResult",
    "SamplingParams",
    "SamplingRow",
    "TokenEvent",
    "default_dtype",
    "generate",
    "generate_ids",
    "load_model",
    "sample",
]
