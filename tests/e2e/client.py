"""A minimal decode client for tests: stream one generation, collect tokens."""

from __future__ import annotations

import grpc

from services.pb.k2.v1 import common_pb2, decode_pb2, decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc


async def generate(
    target: str,
    prompt: list[int],
    max_new_tokens: int,
    sampling: common_pb2.SamplingParams | None = None,
    timeout: float = 60.0,
) -> tuple[list[int], str]:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = decode_pb2_grpc.DecodeStub(channel)
        request = decode_pb2.GenerateRequest(
            prompt_ids=prompt,
            max_new_tokens=max_new_tokens,
            sampling=sampling or common_pb2.SamplingParams(temperature=0.0),
        )
        tokens, reason = [], ""
        async for event in stub.Generate(request, timeout=timeout):
            tokens += [t.token_id for t in event.tokens]
            reason = event.finish_reason or reason
        return tokens, reason


async def decode_stats(target: str) -> decode_pb2.DecodeStats:
    async with grpc.aio.insecure_channel(target) as channel:
        return await decode_pb2_grpc.DecodeStub(channel).Stats(common_pb2.StatsRequest(), timeout=5)


async def prefill_stats(target: str) -> prefill_pb2.PrefillStats:
    async with grpc.aio.insecure_channel(target) as channel:
        return await prefill_pb2_grpc.PrefillStub(channel).Stats(
            common_pb2.StatsRequest(), timeout=5
        )
