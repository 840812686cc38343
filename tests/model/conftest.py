"""Shared tiny checkpoints for model tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from k2model.checkpoint.loader import load_model
from k2model.checkpoint.random_init import random_weights, tiny_config, write_checkpoint
from k2model.model import K2Model


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = tiny_config()
    return write_checkpoint(tmp_path_factory.mktemp("tiny"), cfg, random_weights(cfg, seed=1))


@pytest.fixture(scope="session")
def tiny_fp32(tiny_ckpt: Path) -> K2Model:
    return load_model(tiny_ckpt, dtype=torch.float32)
