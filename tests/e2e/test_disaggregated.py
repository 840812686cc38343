"""Through real prefill and decode processes, tokens equal the in-process generate()."""

from __future__ import annotations

import asyncio
import random

import pytest
import torch
import yaml

from k2model import EMBEDDED_CHECKPOINT, SamplingParams, generate_ids, load_model
from k2model.generation import GenerationRequest
from k2model.generation import generate as run_generate
from services.pb.k2.v1 import common_pb2
from tests.e2e.client import decode_stats, generate, prefill_stats
from tests.e2e.suite_fixtures import start_suite, write_deployment

VOCAB = 3840


@pytest.fixture(scope="module")
def model():
    return load_model(EMBEDDED_CHECKPOINT)


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    path = write_deployment(
        tmp_path_factory.mktemp("dep") / "d.yaml",
        n_prefill=2,
        n_decode=2,
        prefill={"chunk_tokens": 48, "max_batch_tokens": 128},
    )
    s = start_suite(path, names=["prefill-0", "prefill-1", "decode-0", "decode-1"])
    yield s
    s.stop()


def prompts(seed: int, n: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [
        [rng.randrange(VOCAB) for _ in range(rng.choice([1, 5, 40, 130, 300]))] for _ in range(n)
    ]


def test_concurrent_mixed_prompts_equal_generate(suite, model) -> None:
    batch = prompts(1, 12)
    decodes = [i.target for i in suite.deployment.of_kind("decode")]

    async def run():
        return await asyncio.gather(*(generate(decodes[k % 2], p, 10) for k, p in enumerate(batch)))

    served = asyncio.run(run())
    expected = generate_ids(model, batch, 10)
    assert [tokens for tokens, _ in served] == expected
    assert all(reason == "length" for _, reason in served)


def test_seeded_sampling_reproducible_and_equal_to_generate(suite, model) -> None:
    prompt = prompts(2, 1)[0]
    proto = common_pb2.SamplingParams(temperature=0.9, top_p=0.95, seed=77)
    decodes = [i.target for i in suite.deployment.of_kind("decode")]

    async def run():
        return await asyncio.gather(*(generate(t, prompt, 12, proto) for t in decodes))

    (a, _), (b, _) = asyncio.run(run())
    assert a == b
    local = generate_ids(model, [prompt], 12, SamplingParams(temperature=0.9, top_p=0.95, seed=77))
    assert a == local[0]


def test_stop_ids_end_generation(suite, model) -> None:
    prompt = prompts(3, 1)[0]
    free_run = generate_ids(model, [prompt], 8)[0]
    stop = free_run[3]
    target = suite.deployment.of_kind("decode")[0].target

    async def run():
        import grpc

        from services.pb.k2.v1 import decode_pb2, decode_pb2_grpc

        async with grpc.aio.insecure_channel(target) as ch:
            req = decode_pb2.GenerateRequest(
                prompt_ids=prompt,
                max_new_tokens=8,
                stop_ids=[stop],
                sampling=common_pb2.SamplingParams(temperature=0.0),
            )
            return [e async for e in decode_pb2_grpc.DecodeStub(ch).Generate(req, timeout=30)]

    events = asyncio.run(run())
    tokens = [t.token_id for e in events for t in e.tokens]
    assert tokens == free_run[: free_run.index(stop) + 1]
    assert events[-1].finish_reason == "stop" and events[0].prompt_tokens == len(prompt)


def test_all_blocks_free_afterwards(suite) -> None:
    for inst in suite.deployment.of_kind("decode"):
        stats = asyncio.run(decode_stats(inst.target))
        assert stats.kv_blocks_free == stats.kv_blocks_total and stats.running == 0


def test_preemption_under_kv_pressure_keeps_results_exact(tmp_path, model) -> None:
    """A decode pool too small for all sequences preempts and recomputes, without changing text."""
    path = write_deployment(tmp_path / "small.yaml", decode={"kv_blocks": 10, "block_size": 8})
    suite = start_suite(path, names=["prefill-0", "decode-0"])
    try:
        target = suite.deployment.of_kind("decode")[0].target
        batch = [p[:20] for p in prompts(4, 6)]

        async def run():
            return await asyncio.gather(*(generate(target, p, 24) for p in batch))

        served = asyncio.run(run())
        assert [t for t, _ in served] == generate_ids(model, batch, 24)
        stats = asyncio.run(decode_stats(target))
        assert stats.preemptions > 0
        assert stats.kv_blocks_free == stats.kv_blocks_total
    finally:
        suite.stop()


def test_a_bf16_kv_cache_travels_as_bf16_and_equals_generate_with_that_cache(
    tmp_path, model
) -> None:
    """model.kv_dtype bfloat16: prefill streams 2-byte latents (half the bytes per prompt token)
    and decode reads them from its bf16 pool; tokens equal generate() over a bf16 cache."""
    path = write_deployment(tmp_path / "bf16.yaml")
    spec = yaml.safe_load(path.read_text())
    spec["model"] = {"kv_dtype": "bfloat16"}
    path.write_text(yaml.safe_dump(spec))
    suite = start_suite(path, names=["prefill-0", "decode-0"])
    try:
        target = suite.deployment.of_kind("decode")[0].target
        batch = prompts(5, 4)

        async def run():
            return await asyncio.gather(*(generate(target, p, 16) for p in batch))

        served = [t for t, _ in asyncio.run(run())]
        requests = [GenerationRequest(p, 16) for p in batch]
        reference: list[list[int]] = [[] for _ in batch]
        for step in run_generate(model, requests, kv_dtype=torch.bfloat16):
            for event in step:
                reference[event.request].append(event.token_id)
        assert served == reference
        sent = asyncio.run(prefill_stats(suite.deployment.of_kind("prefill")[0].target))
        per_token = model.cfg.num_hidden_layers * model.cfg.kv_cache_dim * 2
        assert sent.kv_bytes_sent == per_token * sum(len(p) for p in batch)
    finally:
        suite.stop()
