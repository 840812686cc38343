"""The chat pipeline: what the tokenizer service's Chat RPC runs for every front door.

Per request (README, request lifecycle):
1. Render the conversation with the model's chat format, here (a worker thread: a long prompt
   must not stall the loop that serves every stream) -> prompt ids and stop ids.
2. Plan tools, response_format (output_plan.py) and thinking, which may extend the prompt and
   add a constraint.
3. For each of the n choices, placement (services/common/placement.py) picks the least-loaded
   decode instance; each choice's ChoiceRun streams decode `Generate` and detokenizes every token
   batch in this process into a ChatEvent (content, reasoning, structured tool-call deltas,
   logprobs).
4. Each choice's last event has finish_reason; the last event of the response has usage (with
   continuous_usage, every event has the usage so far).

Decisions:
- Thinking (docs/model.md, thinking): a K2-Thinking prompt ends at
  `<|im_assistant|>assistant<|im_middle|>` and the model opens `<think>` itself. Thinking off =
  the prompt also gets `<think></think>` (the empty reasoning block the template writes for
  finished turns, and what K2.5's `thinking=False` appends), the think ids are banned, and no
  reasoning is parsed. A forced tool_choice turns thinking off for its turn (the output is the
  call). Thinking on for a model without <think> tokens is InvalidArgument. A partial
  (prefilled) last turn already holds `<think></think>`: its output is content.
- max_tokens: explicit values must fit the context (OutOfRange); the default is what the chosen
  decode instance can hold, capped by the context, minus the prompt (decode's max_new_tokens 0).
- n choices run in parallel with seeds seed + i (mod 2**64) when a seed is given, else each
  decode instance draws its own.
- finish_reason "tool_calls" when a choice produced at least one valid call, else the decode's
  ("stop" / "length"), or "stop" when a stop string matched. parallel_tool_calls=False ends a
  choice when a second call begins (its deltas are dropped).
- Logprobs cover every generated token except a final stop id; token strings are the piece
  decoded as UTF-8 with replacement (exact bytes beside it).
- Cancelling the iteration (client gone) cancels every Generate call; decode frees the request's
  KV blocks on cancellation. Backend statuses map back to ServiceErrors.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace

from k2model.sampling_params import SamplingParams
from k2model.text import chat_tokens as tok
from services.chat.types import ChatEvent, ChatRequest, Usage
from services.common.errors import InvalidArgument, OutOfRange
from services.common.placement import Placement
from services.pb.k2.v1 import decode_pb2_grpc
from services.tokenizer.chat_text import ChatText
from services.tokenizer.choice_run import ChoiceRun, Prepared
from services.tokenizer.detokenize_session import DetokenizeOptions
from services.tokenizer.output_plan import ToolPlan, answer_schema, plan_tools

_UINT64 = 1 << 64


class ChatPipeline:
    def __init__(
        self,
        text: ChatText,
        decodes: Placement[decode_pb2_grpc.DecodeStub],
        *,
        request_timeout_s: float = 600.0,
    ) -> None:
        self.text, self.tokenizer, self.context = text, text.tokenizer, text.context
        self.decodes, self.timeout_s = decodes, request_timeout_s
        self.thinking_model = text.reasoning

    async def count_tokens(self, request: ChatRequest) -> int:
        return len((await self._prepare(request)).prompt_ids)

    async def chat(
        self, request: ChatRequest, timeout_s: float | None = None
    ) -> AsyncIterator[ChatEvent]:
        """timeout_s: this request's budget (the caller's deadline); default request_timeout_s."""
        if request.n < 1:
            raise InvalidArgument(f"n must be >= 1, got {request.n}")
        budget = self.timeout_s if timeout_s is None else min(timeout_s, self.timeout_s)
        prepared = await self._prepare(request)
        peers = await self.decodes.pick(request.n, wait_s=budget)
        request_id = request.request_id or uuid.uuid4().hex
        queue: asyncio.Queue[tuple[ChatEvent, int] | BaseException] = asyncio.Queue()
        runs = [
            ChoiceRun(
                choice=i,
                request_id=f"{request_id}-{i}",
                prepared=prepared,
                params=_choice_params(request.sampling, i),
                peer=peer,
                vocab=self.tokenizer,
                context=self.context,
                timeout_s=budget,
            )
            for i, peer in enumerate(peers)
        ]
        tasks = [asyncio.create_task(run.run(queue.put_nowait)) for run in runs]
        echo = {run.choice: prepared.echo for run in runs if prepared.echo}
        try:
            finished = 0
            counts = [0] * len(tasks)  # tokens generated per choice so far
            while finished < len(tasks):
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                event, counts[event.choice] = item
                if event.choice in echo:  # before the choice's first output, not before errors
                    event = replace(event, content=echo.pop(event.choice) + event.content)
                finished += event.finish_reason is not None
                if finished == len(tasks) or request.continuous_usage:
                    event = replace(event, usage=Usage(len(prepared.prompt_ids), sum(counts)))
                yield event
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _prepare(self, request: ChatRequest) -> Prepared:
        _check_lengths(request)
        if request.prompt_ids:
            return self._prepare_raw(request)
        if not request.messages:
            raise InvalidArgument("messages: at least one message is required")
        plan = plan_tools(request, self.tokenizer)
        thinking = self._thinking(request, plan)
        partial = request.messages[-1].partial
        answer = answer_schema(request.response_format)
        if answer is not None and partial:
            raise InvalidArgument(
                "response_format: a partial assistant message has already begun the answer; "
                "JSON output cannot be constrained from its middle"
            )
        rendered = await asyncio.to_thread(
            self.text.render, request.messages, request.tools, True, request.keep_reasoning
        )
        prompt = list(rendered.prompt_ids)
        banned = list(self.text.unmapped_ids)
        if self.thinking_model and not thinking:
            think = [self.tokenizer.special_id(n) for n in (tok.THINK_BEGIN, tok.THINK_END)]
            banned += think
            if not partial:
                prompt += think
        if request.max_tokens is not None and len(prompt) + request.max_tokens > self.context:
            raise OutOfRange(
                f"prompt ({len(prompt)} tokens) + max_tokens ({request.max_tokens}) exceeds the "
                f"context of {self.context} tokens"
            )
        constraint = plan.constraint(banned, answer, after_think=thinking)
        if request.ignore_eos and constraint is not None and constraint.has_grammar:
            raise InvalidArgument(
                "ignore_eos: a constrained output (a forced or strict tool call, parallel_tool_calls"
                " false, or a JSON response_format) ends at the end of its turn"
            )
        return Prepared(
            prompt_ids=prompt,
            stop_ids=[] if request.ignore_eos else list(rendered.stop_ids),
            max_tokens=request.max_tokens,
            constraint=constraint,
            detokenize=DetokenizeOptions(
                stop=request.stop,
                parse_tool_calls=plan.parse_tool_calls,
                parse_reasoning=thinking and not partial,
                tool_names=plan.tool_names,
                skip_special_tokens=True,
            ),
            parallel_tool_calls=request.parallel_tool_calls,
            min_tokens=request.min_tokens,
            echo=_echo_text(request),
        )

    def _prepare_raw(self, request: ChatRequest) -> Prepared:
        """A raw prompt: its ids exactly, no chat format, plain text out."""
        if request.messages or request.tools or request.response_format is not None:
            raise InvalidArgument("prompt_ids: a raw prompt takes no messages, tools or format")
        bad = [i for i in request.prompt_ids if not 0 <= i < self.text.vocab_size]
        if bad:
            raise InvalidArgument(
                f"prompt_ids: {bad[0]} is not a token id (the vocabulary has "
                f"{self.text.vocab_size})"
            )
        prompt = list(request.prompt_ids)
        if request.max_tokens is not None and len(prompt) + request.max_tokens > self.context:
            raise OutOfRange(
                f"prompt ({len(prompt)} tokens) + max_tokens ({request.max_tokens}) exceeds the "
                f"context of {self.context} tokens"
            )
        return Prepared(
            prompt_ids=prompt,
            stop_ids=[] if request.ignore_eos else sorted(self.tokenizer.stop_ids),
            max_tokens=request.max_tokens,
            constraint=None,
            detokenize=DetokenizeOptions(
                stop=request.stop,
                parse_tool_calls=False,
                parse_reasoning=False,
                tool_names=(),
                skip_special_tokens=True,
            ),
            parallel_tool_calls=True,
            min_tokens=request.min_tokens,
            echo=self.tokenizer.decode(prompt) if request.echo else "",
        )

    def _thinking(self, request: ChatRequest, plan: ToolPlan) -> bool:
        if request.thinking and not self.thinking_model:
            raise InvalidArgument("thinking: this model has no reasoning mode")
        if plan.forced:
            return False
        return self.thinking_model if request.thinking is None else request.thinking


def _echo_text(request: ChatRequest) -> str:
    """The prompt's text, for `echo`: the last message's (a legacy completion's prompt)."""
    if not request.echo:
        return ""
    content = request.messages[-1].content
    if not isinstance(content, str):
        raise InvalidArgument("echo: the last message must be plain text")
    return content


def _check_lengths(request: ChatRequest) -> None:
    if request.min_tokens < 0:
        raise InvalidArgument(f"min_tokens must be >= 0, got {request.min_tokens}")
    if request.max_tokens is not None and request.min_tokens > request.max_tokens:
        raise InvalidArgument(
            f"min_tokens ({request.min_tokens}) must be <= max_tokens ({request.max_tokens})"
        )


def _choice_params(sampling: SamplingParams, choice: int) -> SamplingParams:
    if sampling.seed is None:
        return sampling
    return replace(sampling, seed=(sampling.seed + choice) % _UINT64)
