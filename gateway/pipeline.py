"""The chat pipeline: the one ChatService every front door (REST, Anthropic, gRPC Chat) calls.

Per request (ARCHITECTURE.md, request lifecycle steps 2-7):
1. Render the conversation on a tokenizer instance (Render) -> prompt ids and stop ids.
2. Plan tools (tool_choice.py) and thinking, which may extend the prompt and add a constraint.
3. For each of the n choices, pick the least-loaded decode instance (Stats: queued + running,
   plus what this gateway has already sent it) and open decode `Generate` and tokenizer
   `Detokenize` side by side; every token batch goes through Detokenize and comes out as a
   ChatEvent (content, reasoning, structured tool-call deltas, logprobs).
4. Each choice's last event has finish_reason; the last event of the response has usage.

Decisions:
- Thinking (K2_SPEC 5.1-4): a K2-Thinking prompt ends at `<|im_assistant|>assistant<|im_middle|>`
  and the model opens `<think>` itself. Thinking off = the prompt also gets `<think></think>`
  (the empty reasoning block the template writes for finished turns, and what K2.5's
  `thinking=False` appends), the think ids are banned, and no reasoning is parsed. A forced
  tool_choice turns thinking off for its turn (the output is the call). Thinking on for a model
  without <think> tokens is InvalidArgument. A partial (prefilled) last turn already holds
  `<think></think>`: its output is content.
- max_tokens: explicit values must fit the context (OutOfRange); the default is what the chosen
  decode instance can hold, capped by the context, minus the prompt.
- n choices run in parallel with seeds seed + i (mod 2**64) when a seed is given, else each
  decode instance draws its own.
- finish_reason "tool_calls" when a choice produced at least one valid call, else the decode's
  ("stop" / "length"), or "stop" when a stop string matched. parallel_tool_calls=False ends a
  choice when a second call begins (its deltas are dropped).
- Logprobs cover every generated token except a final stop id; token strings are the piece
  decoded as UTF-8 with replacement (exact bytes beside it).
- Cancelling the iteration (client gone) cancels every Generate / Detokenize call; decode frees
  the request's KV blocks on cancellation. Backend statuses map back to ServiceErrors.
- Peers (tokenizer, decode) come from the deployment only.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace

import grpc

from gateway.chat_codec import message_to_proto, tool_to_proto
from gateway.chat_types import ChatEvent, ChatRequest, Usage
from gateway.choice_stream import ChoiceRun, DecodePeers, Prepared, backend_error
from gateway.tool_choice import ToolPlan, plan_tools
from k2model.config import K2Config
from k2model.sampling_params import SamplingParams
from k2model.text import chat_tokens as tok
from k2model.text.tokenizer import Tokenizer
from services.common.channel import open_channel
from services.common.errors import InvalidArgument, OutOfRange
from services.deployment import Deployment
from services.pb.k2.v1 import tokenizer_pb2, tokenizer_pb2_grpc

_UINT64 = 1 << 64


class ChatPipeline:
    def __init__(
        self,
        deployment: Deployment,
        *,
        request_timeout_s: float = 600.0,
        tokenizer: Tokenizer | None = None,
    ) -> None:
        self.tokenizer = tokenizer or Tokenizer.from_dir(deployment.checkpoint)
        self.context = K2Config.from_dir(deployment.checkpoint).max_position_embeddings
        self.timeout_s = request_timeout_s
        self.thinking_model = _has_token(self.tokenizer, tok.THINK_BEGIN)
        targets = [i.target for i in deployment.of_kind("tokenizer")]
        security = deployment.security
        self._tokenizer_channels = [open_channel(t, security=security) for t in targets]
        self._tokenizers = itertools.cycle(
            [tokenizer_pb2_grpc.TokenizerStub(c) for c in self._tokenizer_channels]
        )
        self.decodes = DecodePeers(deployment.of_kind("decode"), security=security)

    async def close(self) -> None:
        for channel in self._tokenizer_channels:
            await channel.close()
        await self.decodes.close()

    async def count_tokens(self, request: ChatRequest) -> int:
        return len((await self._prepare(request)).prompt_ids)

    async def chat(self, request: ChatRequest) -> AsyncIterator[ChatEvent]:
        if request.n < 1:
            raise InvalidArgument(f"n must be >= 1, got {request.n}")
        prepared = await self._prepare(request)
        peers = await self.decodes.assign(request.n, wait_s=self.timeout_s)
        request_id = request.request_id or uuid.uuid4().hex
        queue: asyncio.Queue[tuple[ChatEvent, int] | BaseException] = asyncio.Queue()
        runs = [
            ChoiceRun(
                choice=i,
                request_id=f"{request_id}-{i}",
                prepared=prepared,
                params=_choice_params(request.sampling, i),
                peer=peer,
                tokenizer_stub=next(self._tokenizers),
                vocab=self.tokenizer,
                context=self.context,
                timeout_s=self.timeout_s,
            )
            for i, peer in enumerate(peers)
        ]
        tasks = [asyncio.create_task(run.run(queue.put_nowait)) for run in runs]
        try:
            finished = completion = 0
            while finished < len(tasks):
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                event, tokens = item
                if event.finish_reason is not None:
                    finished += 1
                    completion += tokens
                    if finished == len(tasks):
                        event = replace(event, usage=Usage(len(prepared.prompt_ids), completion))
                yield event
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _prepare(self, request: ChatRequest) -> Prepared:
        if not request.messages:
            raise InvalidArgument("messages: at least one message is required")
        plan = plan_tools(request, self.tokenizer)
        thinking = self._thinking(request, plan)
        partial = request.messages[-1].partial
        reply = await self._render(request)
        prompt = list(reply.prompt_ids)
        banned: list[int] = []
        if self.thinking_model and not thinking:
            banned = [self.tokenizer.special_id(n) for n in (tok.THINK_BEGIN, tok.THINK_END)]
            if not partial:
                prompt += banned
        if request.max_tokens is not None and len(prompt) + request.max_tokens > self.context:
            raise OutOfRange(
                f"prompt ({len(prompt)} tokens) + max_tokens ({request.max_tokens}) exceeds the "
                f"context of {self.context} tokens"
            )
        return Prepared(
            prompt_ids=prompt,
            stop_ids=list(reply.stop_ids),
            max_tokens=request.max_tokens,
            constraint=plan.constraint(banned),
            detokenize=tokenizer_pb2.DetokenizeStart(
                stop=request.stop,
                parse_tool_calls=plan.parse_tool_calls,
                parse_reasoning=thinking and not partial,
                tool_names=plan.tool_names,
                skip_special_tokens=True,
            ),
            parallel_tool_calls=request.parallel_tool_calls,
        )

    def _thinking(self, request: ChatRequest, plan: ToolPlan) -> bool:
        if request.thinking and not self.thinking_model:
            raise InvalidArgument("thinking: this model has no reasoning mode")
        if plan.forced:
            return False
        return self.thinking_model if request.thinking is None else request.thinking

    async def _render(self, request: ChatRequest) -> tokenizer_pb2.RenderReply:
        render = tokenizer_pb2.RenderRequest(
            messages=[message_to_proto(m) for m in request.messages],
            tools=[tool_to_proto(t) for t in request.tools],
            add_generation_prompt=True,
        )
        try:
            return await next(self._tokenizers).Render(render, timeout=self.timeout_s)
        except grpc.aio.AioRpcError as e:
            raise backend_error(e) from None


def _choice_params(sampling: SamplingParams, choice: int) -> SamplingParams:
    if sampling.seed is None:
        return sampling
    return replace(sampling, seed=(sampling.seed + choice) % _UINT64)


def _has_token(tokenizer: Tokenizer, name: str) -> bool:
    try:
        tokenizer.special_id(name)
    except ValueError:
        return False
    return True
