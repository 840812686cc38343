"""services.common.server and channel against real grpc.aio servers on 127.0.0.1, port 0.

The test servicer is the test-only k2test.Echo service (echo_service.py) with handlers that
raise on request; a generic handler adds the two RPC kinds Echo lacks (unary-stream,
stream-unary), so every kind is seen going through the one error interceptor.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TypeVar

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from services.common import errors
from services.common.channel import health_status, open_channel, wait_ready
from services.common.server import (
    RunningServer,
    ServerOptions,
    deadline_remaining,
    start_server,
)
from tests.services.echo_service import SERVICE, grpc_pb, pb

T = TypeVar("T")
REPO = Path(__file__).resolve().parents[2]
RPC_TIMEOUT_S = 10.0  # a guard so a broken server fails the test instead of hanging it

# The contract (docs/reliability.md section 1): which status each domain error must reach callers as.
EXPECTED_STATUS: dict[type[Exception], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.OutOfRange: grpc.StatusCode.OUT_OF_RANGE,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    ValueError: grpc.StatusCode.INVALID_ARGUMENT,
}
ERRORS = {cls.__name__: cls for cls in EXPECTED_STATUS}
SECRET = "RuntimeError at /srv/weights/shard-7 password=hunter2"
BUG = "bug"  # the error name that raises an unexpected RuntimeError(SECRET)


def make_error(name: str) -> Exception:
    return RuntimeError(SECRET) if name == BUG else ERRORS[name](f"{name} says no")


class FakeEcho(grpc_pb.EchoServicer):
    """Encode: text "raise:<Error>" raises it, "abort" aborts, "hang" waits for cancellation,
    "remaining" returns the deadline left in ms, "big:<n>" returns n ids, else [len(text)].
    Detokenize: `start.stop[0]` names an error raised after the first reply; otherwise it echoes
    each ids message, waiting for `release` after the first one."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.cancelled = asyncio.Event()
        self.stream_closed = asyncio.Event()

    async def Encode(
        self, request: pb.EncodeRequest, context: grpc.aio.ServicerContext
    ) -> pb.EncodeReply:
        command, _, arg = request.text.partition(":")
        if command == "raise":
            raise make_error(arg)
        if command == "abort":
            await context.abort(grpc.StatusCode.NOT_FOUND, "aborted by the handler")
        if command == "hang":
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
        if command == "remaining":
            left = deadline_remaining(context)
            return pb.EncodeReply(ids=[] if left is None else [round(left * 1000)])
        if command == "big":
            return pb.EncodeReply(ids=[7] * int(arg))
        return pb.EncodeReply(ids=[len(request.text)])

    async def Detokenize(
        self,
        request_iterator: AsyncIterator[pb.DetokenizeInput],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.DetokenizeOutput]:
        fail_with = ""
        try:
            async for item in request_iterator:
                if item.HasField("start"):
                    fail_with = item.start.stop[0] if item.start.stop else ""
                    continue
                yield pb.DetokenizeOutput(content=str(list(item.ids.ids)))
                if fail_with:
                    raise make_error(fail_with)
                await self.release.wait()
        finally:
            self.stream_closed.set()


async def _unary_stream(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    yield b"first"
    raise make_error(request.decode())


async def _unary_stream_by_write(request: bytes, context: grpc.aio.ServicerContext) -> None:
    await context.write(b"first")
    raise make_error(request.decode())


async def _stream_unary(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
    async for item in requests:
        raise make_error(item.decode())
    return b"empty"


KINDS = grpc.method_handlers_generic_handler(
    "test.Kinds",
    {
        "UnaryStream": grpc.unary_stream_rpc_method_handler(_unary_stream),
        "UnaryStreamByWrite": grpc.unary_stream_rpc_method_handler(_unary_stream_by_write),
        "StreamUnary": grpc.stream_unary_rpc_method_handler(_stream_unary),
    },
)


@contextlib.asynccontextmanager
async def serving(
    servicer: FakeEcho, options: ServerOptions | None = None
) -> AsyncIterator[tuple[RunningServer, grpc.aio.Channel]]:
    running = await start_server(
        "test",
        [
            lambda s: grpc_pb.add_EchoServicer_to_server(servicer, s),
            lambda s: s.add_generic_rpc_handlers((KINDS,)),
        ],
        [SERVICE],
        options or ServerOptions(),
    )
    channel = open_channel(running.address)
    try:
        yield running, channel
    finally:
        await channel.close()
        await running.server.stop(None)


def detok_start(*stop: str) -> pb.DetokenizeInput:
    return pb.DetokenizeInput(start=pb.DetokenizeStart(stop=stop))


def detok_ids(*ids: int) -> pb.DetokenizeInput:
    return pb.DetokenizeInput(ids=pb.TokenIds(ids=ids))


async def _items(*items: object) -> AsyncIterator[object]:
    for item in items:
        yield item


async def until_none(inputs: asyncio.Queue[T | None]) -> AsyncIterator[T]:
    """A request stream the test drives: what it puts on `inputs`, until it puts None."""
    while (item := await inputs.get()) is not None:
        yield item


async def call_every_kind(
    channel: grpc.aio.Channel, error: str
) -> dict[str, tuple[grpc.StatusCode, str, list[object]]]:
    """Make each RPC kind raise `error`; per kind: (status, details, replies received first)."""
    stub = grpc_pb.EchoStub(channel)
    calls = {
        "unary_unary": lambda: stub.Encode(
            pb.EncodeRequest(text=f"raise:{error}"), timeout=RPC_TIMEOUT_S
        ),
        "stream_stream": lambda: stub.Detokenize(
            _items(detok_start(error), detok_ids(1)), timeout=RPC_TIMEOUT_S
        ),
        "unary_stream": lambda: channel.unary_stream("/test.Kinds/UnaryStream")(
            error.encode(), timeout=RPC_TIMEOUT_S
        ),
        "unary_stream_write": lambda: channel.unary_stream("/test.Kinds/UnaryStreamByWrite")(
            error.encode(), timeout=RPC_TIMEOUT_S
        ),
        "stream_unary": lambda: channel.stream_unary("/test.Kinds/StreamUnary")(
            _items(error.encode()), timeout=RPC_TIMEOUT_S
        ),
    }
    outcomes = {}
    for kind, start in calls.items():
        call = start()
        received: list[object] = []
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            if kind.startswith(("unary_stream", "stream_stream")):
                async for reply in call:
                    received.append(reply)
            else:
                await call
        outcomes[kind] = (raised.value.code(), raised.value.details(), received)
    return outcomes


@pytest.mark.parametrize("error", sorted(ERRORS))
def test_each_domain_error_maps_to_its_status_in_every_rpc_kind(error: str) -> None:
    async def body() -> None:
        async with serving(FakeEcho()) as (_, channel):
            outcomes = await call_every_kind(channel, error)
        for kind, (code, details, received) in outcomes.items():
            assert code == EXPECTED_STATUS[ERRORS[error]], kind
            assert details == f"{error} says no", kind
            if "stream" in kind and kind != "stream_unary":  # raised mid-stream, after a reply
                assert len(received) == 1, kind

    asyncio.run(body())


def test_unexpected_exception_is_internal_and_leaks_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def body() -> dict[str, tuple[grpc.StatusCode, str, list[object]]]:
        async with serving(FakeEcho()) as (_, channel):
            return await call_every_kind(channel, BUG)

    with caplog.at_level(logging.ERROR, logger="services.common.server"):
        outcomes = asyncio.run(body())
    for kind, (code, details, _) in outcomes.items():
        assert code == grpc.StatusCode.INTERNAL, kind
        assert details.startswith("internal error (id "), kind
        for fragment in ("RuntimeError", "/srv", "hunter2", "Traceback"):
            assert fragment not in details, kind
        error_id = details.removeprefix("internal error (id ").removesuffix(")")
        logged = [r for r in caplog.records if error_id in r.getMessage()]
        assert len(logged) == 1 and logged[0].exc_info is not None, kind
        assert str(logged[0].exc_info[1]) == SECRET, kind


def test_handler_abort_and_unimplemented_pass_through(caplog: pytest.LogCaptureFixture) -> None:
    async def body() -> None:
        async with serving(FakeEcho()) as (_, channel):
            stub = grpc_pb.EchoStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as aborted:
                await stub.Encode(pb.EncodeRequest(text="abort"), timeout=RPC_TIMEOUT_S)
            assert aborted.value.code() == grpc.StatusCode.NOT_FOUND
            assert aborted.value.details() == "aborted by the handler"
            with pytest.raises(grpc.aio.AioRpcError) as missing:
                await stub.Missing(pb.EncodeRequest(), timeout=RPC_TIMEOUT_S)
            assert missing.value.code() == grpc.StatusCode.UNIMPLEMENTED

    with caplog.at_level(logging.INFO, logger="services.common.server"):
        asyncio.run(body())
    ours = [r for r in caplog.records if r.name == "services.common.server"]
    assert not [r for r in ours if r.levelno >= logging.WARNING]  # neither is a failure of ours


def test_health_is_not_serving_until_set_serving() -> None:
    async def body() -> None:
        async with serving(FakeEcho()) as (running, channel):
            await wait_ready(channel, RPC_TIMEOUT_S)
            watch = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(service=SERVICE), timeout=RPC_TIMEOUT_S
            )
            first = await watch.read()
            assert await health_status(channel) == "NOT_SERVING"
            assert await health_status(channel, SERVICE) == "NOT_SERVING"
            assert await health_status(channel, "k2.v1.Nope") == "SERVICE_UNKNOWN"
            running.set_serving()
            assert await health_status(channel) == "SERVING"
            assert await health_status(channel, SERVICE) == "SERVING"
            second = await watch.read()
            watch.cancel()
        serving_status = health_pb2.HealthCheckResponse
        assert (first.status, second.status) == (serving_status.NOT_SERVING, serving_status.SERVING)

    asyncio.run(body())


def test_reflection_lists_the_services_and_serves_their_descriptors() -> None:
    async def body() -> tuple[set[str], str]:
        async with serving(FakeEcho()) as (_, channel):
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            replies = [
                reply
                async for reply in stub.ServerReflectionInfo(
                    _items(
                        reflection_pb2.ServerReflectionRequest(list_services=""),
                        reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE),
                    ),
                    timeout=RPC_TIMEOUT_S,
                )
            ]
        names = {s.name for s in replies[0].list_services_response.service}
        file = descriptor_pb2.FileDescriptorProto.FromString(
            replies[1].file_descriptor_response.file_descriptor_proto[0]
        )
        return names, file.name

    names, file_name = asyncio.run(body())
    assert names == {SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"}
    assert file_name == "echo.proto"


def test_messages_over_the_size_limit_are_refused() -> None:
    async def body() -> None:
        async with serving(FakeEcho(), ServerOptions(max_message_bytes=1024)) as (_, ch):
            stub = grpc_pb.EchoStub(ch)
            ok = await stub.Encode(pb.EncodeRequest(text="x" * 900), timeout=10)
            assert list(ok.ids) == [900]
            for text in ("x" * 2048, "big:2000"):  # request too big; reply too big to send
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await stub.Encode(pb.EncodeRequest(text=text), timeout=10)
                assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, text[:8]
        async with serving(FakeEcho()) as (running, _):
            small = open_channel(running.address, max_message_bytes=1024)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await grpc_pb.EchoStub(small).Encode(pb.EncodeRequest(text="big:2000"), timeout=10)
            await small.close()
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

    asyncio.run(body())


def test_drain_finishes_in_flight_streams_and_refuses_new_calls() -> None:
    async def body() -> None:
        echo = FakeEcho()
        async with serving(echo) as (running, channel):
            running.set_serving()
            watch = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(), timeout=RPC_TIMEOUT_S
            )
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
            inputs: asyncio.Queue[pb.DetokenizeInput | None] = asyncio.Queue()
            stream = grpc_pb.EchoStub(channel).Detokenize(until_none(inputs), timeout=RPC_TIMEOUT_S)
            for item in (detok_start(), detok_ids(1)):
                inputs.put_nowait(item)
            assert (await stream.read()).content == "[1]"  # in flight, blocked on `release`

            drain = asyncio.create_task(running.drain(grace_s=RPC_TIMEOUT_S))
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
            assert await watch.read() is grpc.aio.EOF  # watches end so they never hold a drain
            for fresh in (channel, open_channel(running.address)):
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await grpc_pb.EchoStub(fresh).Encode(
                        pb.EncodeRequest(text="x"), timeout=RPC_TIMEOUT_S
                    )
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert not drain.done()

            echo.release.set()
            inputs.put_nowait(detok_ids(2, 3))
            inputs.put_nowait(None)
            assert (await stream.read()).content == "[2, 3]"
            assert await stream.read() is grpc.aio.EOF
            assert await stream.code() == grpc.StatusCode.OK
            await drain

    asyncio.run(body())


def test_deadline_reaches_the_client_and_cancels_the_handler() -> None:
    async def body() -> None:
        echo = FakeEcho()
        async with serving(echo) as (_, channel):
            stub = grpc_pb.EchoStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as expired:
                await stub.Encode(pb.EncodeRequest(text="hang"), timeout=0.2)
            assert expired.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            await asyncio.wait_for(echo.cancelled.wait(), RPC_TIMEOUT_S)

            none = await stub.Encode(pb.EncodeRequest(text="remaining"))
            some = await stub.Encode(pb.EncodeRequest(text="remaining"), timeout=30)
            assert list(none.ids) == []
            assert 10_000 < some.ids[0] < 60_000  # the caller's 30 s (grpc rounds it up a bit)

    asyncio.run(body())


def test_client_cancel_closes_the_streaming_handler() -> None:
    async def body() -> None:
        echo = FakeEcho()
        async with serving(echo) as (_, channel):
            stream = grpc_pb.EchoStub(channel).Detokenize(
                _items(detok_start(), detok_ids(1)), timeout=RPC_TIMEOUT_S
            )
            assert (await stream.read()).content == "[1]"
            stream.cancel()
            await asyncio.wait_for(echo.stream_closed.wait(), RPC_TIMEOUT_S)

    asyncio.run(body())


def test_default_bind_is_loopback_and_ports_are_not_shared() -> None:
    async def body() -> None:
        async with serving(FakeEcho()) as (running, _):
            assert running.address == f"127.0.0.1:{running.port}" and running.port > 0
            with pytest.raises(OSError, match="cannot bind"):
                await start_server("twin", [], [SERVICE], ServerOptions(bind=running.address))

    assert ServerOptions().bind.startswith("127.0.0.1:")
    asyncio.run(body())
