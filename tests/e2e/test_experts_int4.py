"""An INT4 checkpoint (K2-Thinking's format) served with its routed experts on a 2-rank expert
pool: each rank loads only its slice of the packed experts, the remote MoE equals the in-process
INT4 MoE, and served tokens equal in-process generate()."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml

from k2model import K2Model, generate_ids, load_model
from services.experts.client import ExpertsClient
from services.launcher import Suite
from tests.e2e.test_experts import PROMPTS, check_equal_to_in_process, pool_target, served, write


@pytest.fixture(scope="module")
def int4_model(int4_embedded: tuple[Path, Path]) -> K2Model:
    return load_model(int4_embedded[0], torch.float32)


@pytest.fixture(scope="module")
def int4_suite(int4_embedded: tuple[Path, Path], tmp_path_factory) -> Iterator[Suite]:
    path = write(tmp_path_factory.mktemp("int4") / "int4.yaml", ranks=2)
    spec = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump(spec | {"checkpoint": str(int4_embedded[0])}))
    suite = Suite(path)
    try:
        suite.start(names=["experts-0", "prefill-0", "decode-0"])
        yield suite
    finally:
        suite.stop()


def test_remote_int4_experts_equal_in_process(int4_suite: Suite, int4_model: K2Model) -> None:
    assert all(m.experts.int4 for m in int4_model.moe_layers().values())
    check_equal_to_in_process(pool_target(int4_suite), int4_model, seed=4)
    client = ExpertsClient(pool_target(int4_suite))
    stats = client.stats()
    client.close()
    assert (stats.ranks, stats.experts_per_rank) == (2, 4)


def test_served_int4_generation_equals_generate(int4_suite: Suite, int4_model: K2Model) -> None:
    assert served(int4_suite, PROMPTS, 8) == generate_ids(int4_model, PROMPTS, 8)
