"""An idle channel's keepalive pings are welcome: no GOAWAY (too_many_pings) from our servers.

Regression: the servers set `grpc.http2.min_recv_ping_interval_without_data_ms`,
which is not a gRPC option, so the real one (`grpc.http2.min_ping_interval_without_data_ms`)
stayed at its 5-minute default; clients ping every 10 s, and servers answered GOAWAY
too_many_pings after two strikes (4 times in 6 minutes). Here the client pings every 1.2 s on a
channel with no calls; a GOAWAY closes the connection, which the channel shows as leaving READY."""

from __future__ import annotations

import asyncio

import grpc

from services.common.channel import open_channel
from services.common.server import ServerOptions, start_server

PING_MS = 1_200
IDLE_S = 8.0  # several ping periods: the default strike limit (2) is passed after ~3 pings


async def _states_while_idle() -> list[grpc.ChannelConnectivity]:
    running = await start_server("idle", [], [], ServerOptions())
    channel = open_channel(running.address, keepalive_time_ms=PING_MS)
    try:
        await asyncio.wait_for(channel.channel_ready(), 10)
        seen = [channel.get_state()]
        deadline = asyncio.get_running_loop().time() + IDLE_S
        while (left := deadline - asyncio.get_running_loop().time()) > 0:
            try:
                await asyncio.wait_for(channel.wait_for_state_change(seen[-1]), left)
            except TimeoutError:
                break
            seen.append(channel.get_state())
        return seen
    finally:
        await channel.close()
        await running.server.stop(None)


def test_an_idle_pinging_channel_is_never_sent_away() -> None:
    assert asyncio.run(_states_while_idle()) == [grpc.ChannelConnectivity.READY]
