"""One choice of a chat response, run against the backends; and the decode peers it runs on.

`ChoiceRun` drives decode `Generate` and tokenizer `Detokenize` side by side: each token batch
from decode is written to Detokenize and its reply (safe text, reasoning, tool-call deltas)
becomes one ChatEvent, with the batch's logprobs. Both calls are cancelled whenever the run
ends (finished, stop string, failure, or the task cancelled because the client went away), and
decode frees the KV of a cancelled call at once.

`DecodePeers` are the decode instances of the deployment, chosen least-loaded from their last
polled Stats (queued + running) plus what this gateway has in flight on each. Stats are polled in
the background, never per request: a slow reply under load (the decode loop is busy) only
delays the next poll, it cannot fail a request. A peer whose last poll failed is left out while
another answers; with none answering, every peer is tried and the call itself reports.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import grpc

from gateway.chat_codec import tool_delta_from_proto
from gateway.chat_types import ChatEvent, TokenLogprob, ToolCallDelta
from gateway.metrics import DecodeLoad
from k2model.constraints import ConstraintSpec
from k2model.sampling_params import SamplingParams
from k2model.text.tokenizer import Tokenizer
from services.common import errors
from services.common.channel import open_channel
from services.common.constraint_codec import constraint_to_proto
from services.common.sampling_codec import sampling_to_proto
from services.common.security import Security
from services.deployment import Instance
from services.pb.k2.v1 import (
    common_pb2,
    decode_pb2,
    decode_pb2_grpc,
    tokenizer_pb2,
    tokenizer_pb2_grpc,
)

_FROM_STATUS: dict[grpc.StatusCode, type[errors.ServiceError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidArgument,
    grpc.StatusCode.OUT_OF_RANGE: errors.OutOfRange,
    grpc.StatusCode.NOT_FOUND: errors.NotFound,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: errors.Unavailable,
    grpc.StatusCode.CANCELLED: errors.Unavailable,  # a backend that went away mid-call
    grpc.StatusCode.DEADLINE_EXCEEDED: errors.DeadlineExceeded,
    grpc.StatusCode.FAILED_PRECONDITION: errors.FailedPrecondition,
}


class BackendError(RuntimeError):
    """A backend failed in a way the caller cannot act on (INTERNAL for the caller)."""


def backend_error(e: grpc.aio.AioRpcError) -> Exception:
    """A backend's status as the domain error the gateway reports for it."""
    cls = _FROM_STATUS.get(e.code())
    if cls is None:
        return BackendError(f"backend {e.code().name}")
    return cls(e.details() or e.code().name.lower())


@dataclass(frozen=True)
class Prepared:
    """A request rendered and planned: what every choice of it shares."""

    prompt_ids: list[int]
    stop_ids: list[int]
    max_tokens: int | None
    constraint: ConstraintSpec | None
    detokenize: tokenizer_pb2.DetokenizeStart
    parallel_tool_calls: bool


@dataclass(eq=False)
class DecodePeer:
    instance: Instance
    stub: decode_pb2_grpc.DecodeStub
    channel: grpc.aio.Channel
    inflight: int = 0
    load: int = 0  # queued + running at the last poll
    kv_free: int = 0
    last: decode_pb2.DecodeStats | None = None  # the last Stats reply
    healthy: bool | None = None  # None: not polled yet

    @property
    def capacity(self) -> int:
        """Tokens one sequence can hold on this instance."""
        return self.instance.kv_blocks * self.instance.block_size


class DecodePeers:
    def __init__(
        self,
        instances: Sequence[Instance],
        poll_interval_s: float = 0.25,
        stats_timeout_s: float = 5.0,
        security: Security | None = None,
    ) -> None:
        self.poll_interval_s, self.stats_timeout_s = poll_interval_s, stats_timeout_s
        self.peers = []
        for inst in instances:
            channel = open_channel(inst.target, security=security)
            self.peers.append(DecodePeer(inst, decode_pb2_grpc.DecodeStub(channel), channel))
        self._poller: asyncio.Task | None = None
        self._first_poll: asyncio.Event | None = None

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
        for peer in self.peers:
            await peer.channel.close()

    async def assign(self, n: int, wait_s: float) -> list[DecodePeer]:
        """n picks, each the least loaded counting the picks before it. The first call waits
        (up to wait_s, the request's own budget) for the first round of Stats."""
        await self._polled(wait_s)
        candidates = [p for p in self.peers if p.healthy] or self.peers
        loads = {p: [p.load + p.inflight, -p.kv_free] for p in candidates}
        picks = []
        for _ in range(n):
            peer = min(loads, key=lambda p: loads[p])
            loads[peer][0] += 1
            picks.append(peer)
        return picks

    async def loads(self) -> list[DecodeLoad]:
        """The last polled Stats of every decode that answered (the gateway's /metrics)."""
        await self._polled(self.stats_timeout_s)
        return [
            DecodeLoad(
                p.instance.name,
                p.last.queued,
                p.last.running,
                p.last.kv_blocks_total,
                p.last.kv_blocks_free,
            )
            for p in self.peers
            if p.healthy and p.last is not None
        ]

    async def _polled(self, wait_s: float) -> None:
        """Polling runs (started on first use: grpc.aio channels live in the serving loop), and
        its first round is in, or wait_s has passed."""
        if self._poller is None:
            self._first_poll = asyncio.Event()
            self._poller = asyncio.create_task(self._poll())
        assert self._first_poll is not None
        if not self._first_poll.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._first_poll.wait(), wait_s)

    async def _poll(self) -> None:
        assert self._first_poll is not None
        while True:
            await asyncio.gather(*(self._poll_one(p) for p in self.peers))
            self._first_poll.set()
            await asyncio.sleep(self.poll_interval_s)

    async def _poll_one(self, peer: DecodePeer) -> None:
        try:
            reply = await peer.stub.Stats(common_pb2.StatsRequest(), timeout=self.stats_timeout_s)
        except grpc.aio.AioRpcError:
            peer.healthy = False
            return
        peer.healthy, peer.load = True, reply.queued + reply.running
        peer.kv_free, peer.last = reply.kv_blocks_free, reply


@dataclass
class _CallTracker:
    """Which calls of a choice are valid, and where parallel_tool_calls=False cuts it."""

    parallel: bool
    started: set[int] = field(default_factory=set)
    invalid: set[int] = field(default_factory=set)
    cut: bool = False

    def keep(self, deltas: Sequence[tokenizer_pb2.ToolCallDelta]) -> tuple[ToolCallDelta, ...]:
        kept = []
        for d in deltas:
            if self.cut or (not self.parallel and d.index >= 1):
                self.cut = True
                continue
            self.started.update([d.index] if d.id else [])
            self.invalid.update([d.index] if d.error else [])
            kept.append(tool_delta_from_proto(d))
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
    tokenizer_stub: tokenizer_pb2_grpc.TokenizerStub
    vocab: Tokenizer
    context: int
    timeout_s: float
    tokens: int = 0

    async def run(self, emit: Emit) -> None:
        """Emits (event, 0) per delta and (last event, tokens generated) at the end, or the
        error that ended the choice."""
        try:
            await self._run(emit)
        except asyncio.CancelledError:
            raise
        except grpc.aio.AioRpcError as e:
            emit(backend_error(e))
        except Exception as e:
            emit(e)

    def _max_new_tokens(self) -> int:
        if self.prepared.max_tokens is not None:
            return self.prepared.max_tokens
        prompt = len(self.prepared.prompt_ids)
        if prompt >= self.context:
            raise errors.OutOfRange(f"the prompt ({prompt} tokens) fills the context")
        return max(1, min(self.context, self.peer.capacity) - prompt)

    async def _run(self, emit: Emit) -> None:
        prepared = self.prepared
        request = decode_pb2.GenerateRequest(
            request_id=self.request_id,
            prompt_ids=prepared.prompt_ids,
            sampling=sampling_to_proto(self.params),
            max_new_tokens=self._max_new_tokens(),
            stop_ids=prepared.stop_ids,
            constraint=constraint_to_proto(prepared.constraint),
        )
        self.peer.inflight += 1
        generate = self.peer.stub.Generate(request, timeout=self.timeout_s)
        detokenize = self.tokenizer_stub.Detokenize(timeout=self.timeout_s)
        calls = _CallTracker(prepared.parallel_tool_calls)
        try:
            await detokenize.write(tokenizer_pb2.DetokenizeInput(start=prepared.detokenize))
            decode_reason = None
            async for batch in generate:
                decode_reason = batch.finish_reason or None
                ids = [t.token_id for t in batch.tokens]
                self.tokens += len(ids)
                ids_msg = tokenizer_pb2.DetokenizeInput(ids=tokenizer_pb2.TokenIds(ids=ids))
                await detokenize.write(ids_msg)
                out = await _read(detokenize)
                event = self._event(out, batch, calls)
                if out.stopped or calls.cut:  # a stop string or a second call: the end
                    emit((replace(event, finish_reason=calls.finish_reason("stop")), self.tokens))
                    return
                if _has_output(event):
                    emit((event, 0))
            if decode_reason is None:
                raise errors.Unavailable("decode ended the stream before finishing")
            await detokenize.done_writing()
            last = self._event(await _read(detokenize), None, calls)
            emit((replace(last, finish_reason=calls.finish_reason(decode_reason)), self.tokens))
        finally:
            self.peer.inflight -= 1
            generate.cancel()
            detokenize.cancel()

    def _event(
        self,
        out: tokenizer_pb2.DetokenizeOutput,
        batch: decode_pb2.GenerateEvent | None,
        calls: _CallTracker,
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


async def _read(call: grpc.aio.StreamStreamCall) -> tokenizer_pb2.DetokenizeOutput:
    out = await call.read()
    if out is grpc.aio.EOF:
        raise errors.Unavailable("the tokenizer ended the Detokenize stream early")
    return out


def _has_output(event: ChatEvent) -> bool:
    return bool(event.content or event.reasoning or event.tool_calls or event.logprobs)
