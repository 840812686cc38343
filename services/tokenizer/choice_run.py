"""One choice of a chat response: decode's token stream in, ChatEvents out, in this process.

`ChoiceRun` opens decode `Generate` on the instance placement picked and feeds every token batch
to a DetokenizeSession (safe text, reasoning, tool-call deltas) here, beside the vocabulary it
needs for logprob pieces: one message per token batch on the wire (decode -> tokenizer), and the
event goes straight out to the gateway. The Generate call is cancelled whenever the run ends
(finished, stop string, failure, or the task cancelled because the client went away), and decode
frees the KV of a cancelled call at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import grpc

from k2model.constraint_spec import ConstraintSpec
from k2model.sampling_params import SamplingParams
from k2model.text.tokenizer import Tokenizer
from services.chat.types import ChatEvent, TokenLogprob, ToolCallDelta
from services.common import errors
from services.common.channel import error_from_status, wait_ready
from services.common.constraint_codec import constraint_to_proto
from services.common.placement import Peer
from services.common.sampling_codec import sampling_to_proto
from services.pb.k2.v1 import common_pb2, decode_pb2, decode_pb2_grpc
from services.tokenizer.detokenize_session import DetokenizeOptions, DetokenizeSession, Output

DecodePeer = Peer[decode_pb2_grpc.DecodeStub]
CONNECT_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class Prepared:
    """A request rendered and planned: what every choice of it shares."""

    prompt_ids: list[int]
    stop_ids: list[int]
    max_tokens: int | None
    constraint: ConstraintSpec | None
    detokenize: DetokenizeOptions
    parallel_tool_calls: bool
    min_tokens: int = 0
    echo: str = ""  # each choice's output starts with this text


@dataclass
class CallTracker:
    """Which calls of a choice are valid, and where parallel_tool_calls=False cuts it."""

    parallel: bool
    started: set[int] = field(default_factory=set)
    invalid: set[int] = field(default_factory=set)
    cut: bool = False

    def keep(self, deltas: Sequence[ToolCallDelta]) -> tuple[ToolCallDelta, ...]:
        kept = []
        for d in deltas:
            if self.cut or (not self.parallel and d.index >= 1):
                self.cut = True
                continue
            self.started.update([d.index] if d.id else [])
            self.invalid.update([d.index] if d.error else [])
            kept.append(d)
        return tuple(kept)

    def finish_reason(self, otherwise: str) -> str:
        return "tool_calls" if self.started - self.invalid else otherwise


Emit = Callable[[tuple[ChatEvent, int] | BaseException], None]


@dataclass
class ChoiceRun:
    choice: int
    request_id: str
    prepared: Prepared
    params: SamplingParams
    peer: DecodePeer
    vocab: Tokenizer
    context: int
    timeout_s: float
    tokens: int = 0

    async def run(self, emit: Emit) -> None:
        """Emits (event, tokens generated so far) per delta and for the last event, or the
        error that ended the choice."""
        try:
            await self._run(emit)
        except asyncio.CancelledError:
            raise
        except grpc.aio.AioRpcError as e:
            emit(error_from_status(e))
        except Exception as e:
            emit(e)

    def _max_new_tokens(self) -> int:
        """The request's max_tokens, or 0: decode fills what the context and its pool leave."""
        if self.prepared.max_tokens is not None:
            return self.prepared.max_tokens
        prompt = len(self.prepared.prompt_ids)
        if prompt >= self.context:
            raise errors.OutOfRange(f"the prompt ({prompt} tokens) fills the context")
        return 0

    async def _run(self, emit: Emit) -> None:
        prepared = self.prepared
        session = DetokenizeSession(self.vocab, prepared.detokenize)
        request = decode_pb2.GenerateRequest(
            request_id=self.request_id,
            prompt_ids=prepared.prompt_ids,
            sampling=sampling_to_proto(self.params),
            max_new_tokens=self._max_new_tokens(),
            stop_ids=prepared.stop_ids,
            constraint=constraint_to_proto(prepared.constraint),
            min_new_tokens=prepared.min_tokens,
        )
        calls = CallTracker(prepared.parallel_tool_calls)
        with self.peer.busy():
            # A channel whose last dial failed (decode restarted, or came up after this process
            # first polled it) fails calls at once until its reconnect backoff ends: wait that
            # out, briefly, so a peer that is back is used and one that is down still fails fast.
            await wait_ready(self.peer.channel, CONNECT_TIMEOUT_S)
            generate = self.peer.stub.Generate(request, timeout=self.timeout_s)
            try:
                decode_reason = None
                async for batch in generate:
                    decode_reason = batch.finish_reason or None
                    ids = [t.token_id for t in batch.tokens]
                    self.tokens += len(ids)
                    out = session.push(ids)
                    event = self._event(out, batch, calls)
                    if out.stopped or calls.cut:  # a stop string or a second call: the end
                        reason = calls.finish_reason("stop")
                        emit((replace(event, finish_reason=reason), self.tokens))
                        return
                    if _has_output(event):
                        emit((event, self.tokens))
                if decode_reason is None:
                    raise errors.Unavailable("decode ended the stream before finishing")
                last = self._event(session.finish(), None, calls)
                reason = calls.finish_reason(decode_reason)
                emit((replace(last, finish_reason=reason), self.tokens))
            finally:
                generate.cancel()

    def _event(
        self, out: Output, batch: decode_pb2.GenerateEvent | None, calls: CallTracker
    ) -> ChatEvent:
        return ChatEvent(
            choice=self.choice,
            content=out.content,
            reasoning=out.reasoning,
            tool_calls=calls.keep(out.tool_calls),
            logprobs=self._logprobs(batch) if batch is not None else (),
        )

    def _logprobs(self, batch: decode_pb2.GenerateEvent) -> tuple[TokenLogprob, ...]:
        tokens = list(batch.tokens)
        if (
            batch.finish_reason == "stop"
            and tokens
            and tokens[-1].token_id in self.prepared.stop_ids
        ):
            tokens.pop()  # the turn's end: no text, not part of the answer
        return tuple(self._logprob(t) for t in tokens if t.HasField("logprob"))

    def _logprob(self, t: common_pb2.SampledToken) -> TokenLogprob:
        text, raw = self._piece(t.token_id)
        top = tuple((s, e.logprob, b) for e in t.top_logprobs for s, b in [self._piece(e.token_id)])
        return TokenLogprob(text, t.logprob, raw, top)

    def _piece(self, token_id: int) -> tuple[str, tuple[int, ...]]:
        raw = self.vocab.id_to_piece(token_id)
        return raw.decode("utf-8", errors="replace"), tuple(raw)


def _has_output(event: ChatEvent) -> bool:
    return bool(event.content or event.reasoning or event.tool_calls or event.logprobs)
