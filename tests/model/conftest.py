"""Shared tiny checkpoints, and the embedded vocabulary's constraint compiler, for model tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from k2model import EMBEDDED_CHECKPOINT
from k2model.checkpoint.loader import load_model
from k2model.checkpoint.random_init import random_weights, tiny_config, write_checkpoint
from k2model.constraints import ConstraintCompiler, Vocabulary
from k2model.model import K2Model
from k2model.text.tokenizer import Tokenizer


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = tiny_config()
    return write_checkpoint(tmp_path_factory.mktemp("tiny"), cfg, random_weights(cfg, seed=1))


@pytest.fixture(scope="session")
def tiny_fp32(tiny_ckpt: Path) -> K2Model:
    return load_model(tiny_ckpt, dtype=torch.float32)


CONSTRAINT_VOCAB = 4096  # the embedded tokenizer's ids fit: masks over the model's vocabulary


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_dir(EMBEDDED_CHECKPOINT)


@pytest.fixture(scope="session")
def compiler(tokenizer: Tokenizer) -> ConstraintCompiler:
    """Constrained decoding over the embedded vocabulary (test_constraints*.py)."""
    return ConstraintCompiler(Vocabulary.from_tokenizer(tokenizer, CONSTRAINT_VOCAB))
