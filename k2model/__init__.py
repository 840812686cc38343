"""Kimi K2 in PyTorch: config, model, checkpoint loading, sampling and in-process generation.

from k2model import load_model, generate_ids, EMBEDDED_CHECKPOINT
model = load_model(EMBEDDED_CHECKPOINT)          # or a real K2 checkpoint directory
print(generate_ids(model, [[1, 2, 3]], max_new_tokens=8))

The names below are imported on first use (PEP 562), so a process that only needs the pure-Python
parts (k2model.text.messages, k2model.sampling_params: the gateway) never loads torch.
"""

from importlib import import_module
from pathlib import Path
from typing import TYPE_CHECKING, Any

EMBEDDED_CHECKPOINT = Path(__file__).parent / "embedded"

_HOME = {
    "ConfigError": "k2model.config",
    "K2Config": "k2model.config",
    "default_dtype": "k2model.runtime",
    "Runtime": "k2model.runtime",
    "load_model": "k2model.checkpoint.loader",
    "GenerationRequest": "k2model.generation",
    "TokenEvent": "k2model.generation",
    "generate": "k2model.generation",
    "generate_ids": "k2model.generation",
    "K2Model": "k2model.model",
    "SampleResult": "k2model.sampling",
    "sample": "k2model.sampling",
    "SamplingParams": "k2model.sampling_params",
    "SamplingRow": "k2model.sampling_params",
}

__all__ = [
    "EMBEDDED_CHECKPOINT",
    "ConfigError",
    "GenerationRequest",
    "K2Config",
    "K2Model",
    "Runtime",
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

if TYPE_CHECKING:
    from k2model.checkpoint.loader import load_model
    from k2model.config import ConfigError, K2Config
    from k2model.generation import GenerationRequest, TokenEvent, generate, generate_ids
    from k2model.model import K2Model
    from k2model.runtime import Runtime, default_dtype
    from k2model.sampling import SampleResult, sample
    from k2model.sampling_params import SamplingParams, SamplingRow


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'k2model' has no attribute {name!r}")
    value = getattr(import_module(_HOME[name]), name)
    globals()[name] = value
    return value
