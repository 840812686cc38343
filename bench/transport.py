"""Round-trip time of one expert hop's bytes by transport, between two processes on this host.

    python3 bench/transport.py [--dim 7168] [--out bench/results/transport.json]

A hop sends B rows of hidden state (bf16, D wide) plus ids and weights, and gets B rows back;
the far side only copies (no compute), so this is the transport's own cost: gRPC unary with one
bytes field (the control plane's stack, protobuf framing included), ZeroMQ over TCP loopback,
ZeroMQ over a Unix socket (ipc), shared memory with a ZeroMQ ipc doorbell (the rows are
written into a segment mapped by both sides; 16 bytes cross the socket each way), and the data
plane's own choice: frame sets on a plain TCP socket read by the waiting thread
(services/experts/framing.py; `socket`), and shared memory with that socket as the doorbell
(`socket_shm`). Median of 200 round trips after 20 warm-ups, per batch 1 / 32 / 256; ratios
against gRPC in the same run.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import select
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent import futures
from multiprocessing import shared_memory
from pathlib import Path

import grpc
import zmq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import format_table, free_port, write_json  # noqa: E402
from services.experts import framing  # noqa: E402

BATCHES = (1, 32, 256)
TOP_K = 8
RUNS, WARMUP = 200, 20
_ECHO = "/bench.Echo/Call"


def payload_bytes(batch: int, dim: int) -> int:
    return batch * dim * 2 + batch * TOP_K * (4 + 4)  # bf16 rows, int32 ids, fp32 weights


def _serve_grpc(port: int, ready: mp.Event) -> None:
    handler = grpc.method_handlers_generic_handler(
        "bench.Echo",
        {"Call": grpc.unary_unary_rpc_method_handler(lambda req, ctx: req)},
    )
    opts = [("grpc.max_receive_message_length", 1 << 28), ("grpc.max_send_message_length", 1 << 28)]
    server = grpc.server(futures.ThreadPoolExecutor(2), options=opts)
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    ready.set()
    server.wait_for_termination()


def _serve_zmq(address: str, ready: mp.Event) -> None:
    sock = zmq.Context().socket(zmq.REP)
    sock.bind(address)
    ready.set()
    while True:
        frame = sock.recv(copy=False)
        sock.send(frame, copy=False)


def _serve_shm(address: str, name: str, ready: mp.Event) -> None:
    shm = shared_memory.SharedMemory(name=name)
    sock = zmq.Context().socket(zmq.REP)
    sock.bind(address)
    ready.set()
    view = shm.buf
    while True:
        size = int.from_bytes(sock.recv(), "little")
        half = len(view) // 2
        view[half : half + size] = view[:size]  # the reply written where the caller reads it
        sock.send(size.to_bytes(8, "little"))


def _serve_socket(port: int, name: str | None, ready: mp.Event) -> None:
    """Echoes frame sets; with a segment `name`, copies its request half to its reply half."""
    shm = shared_memory.SharedMemory(name=name) if name else None
    view = shm.buf if shm else None
    listener = socket.create_server(("127.0.0.1", port))
    ready.set()
    conn, _ = listener.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    conn.setblocking(False)
    idle = select.poll()
    idle.register(conn, select.POLLIN)
    while True:
        idle.poll()
        frames = framing.recv_frames(conn, 1 << 30, 10)
        if view is not None:
            size, half = int.from_bytes(frames[0], "little"), len(view) // 2
            view[half : half + size] = view[:size]
        framing.send_frames(conn, frames, 10)


def _socket_call(sock: socket.socket, frames: list[bytes]) -> None:
    framing.send_frames(sock, frames, 10)
    framing.wait(sock, select.POLLIN, time.monotonic() + 10)
    framing.recv_frames(sock, 1 << 30, 10)


def _calls(
    data: bytes,
    shm: shared_memory.SharedMemory,
    socks: dict[str, zmq.Socket],
    plain: dict[str, socket.socket],
    echo,
) -> dict[str, Callable[[], object]]:
    """One round trip of `data` by each transport."""
    size, half = len(data), len(shm.buf) // 2

    def over_socket_shm() -> None:
        shm.buf[:size] = data
        _socket_call(plain["socket_shm"], [size.to_bytes(8, "little")])
        bytes(shm.buf[half : half + size])

    def over_shm() -> None:
        shm.buf[:size] = data
        socks["shm"].send(size.to_bytes(8, "little"))
        socks["shm"].recv()
        bytes(shm.buf[half : half + size])

    def over(name: str) -> Callable[[], object]:
        return lambda: (socks[name].send(data, copy=False), socks[name].recv())

    return {
        "grpc": lambda: echo(data, timeout=10),
        "zmq_tcp": over("zmq_tcp"),
        "zmq_ipc": over("zmq_ipc"),
        "shm": over_shm,
        "socket": lambda: _socket_call(plain["socket"], [data]),
        "socket_shm": over_socket_shm,
    }


def _median_us(call: Callable[[], object]) -> float:
    for _ in range(WARMUP):
        call()
    times = []
    for _ in range(RUNS):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return 1e6 * statistics.median(times)


def run(dim: int) -> list[dict[str, float]]:
    ctx = mp.get_context("spawn")
    biggest = payload_bytes(max(BATCHES), dim)
    shm = shared_memory.SharedMemory(create=True, size=2 * biggest)
    tmp = tempfile.mkdtemp()
    servers = {
        "grpc": (_serve_grpc, (free_port(),)),
        "zmq_tcp": (_serve_zmq, (f"tcp://127.0.0.1:{free_port()}",)),
        "zmq_ipc": (_serve_zmq, (f"ipc://{tmp}/echo",)),
        "shm": (_serve_shm, (f"ipc://{tmp}/shm", shm.name)),
        "socket": (_serve_socket, (free_port(), None)),
        "socket_shm": (_serve_socket, (free_port(), shm.name)),
    }
    procs = []
    try:
        for target, args in servers.values():
            ready = ctx.Event()
            proc = ctx.Process(target=target, args=(*args, ready), daemon=True)
            proc.start()
            procs.append(proc)
            ready.wait(30)
        opts = [("grpc.max_receive_message_length", 1 << 28)]
        channel = grpc.insecure_channel(f"127.0.0.1:{servers['grpc'][1][0]}", options=opts)
        echo = channel.unary_unary(_ECHO)
        z = zmq.Context()
        socks = {}
        for name in ("zmq_tcp", "zmq_ipc", "shm"):
            socks[name] = z.socket(zmq.REQ)
            socks[name].connect(servers[name][1][0])
        plain = {}
        for name in ("socket", "socket_shm"):
            plain[name] = socket.create_connection(("127.0.0.1", servers[name][1][0]))
            plain[name].setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            plain[name].setblocking(False)
        results = []
        for batch in BATCHES:
            size = payload_bytes(batch, dim)
            calls = _calls(bytes(size), shm, socks, plain, echo)
            row = {"batch": batch, "bytes": size}
            row |= {f"{name}_us": _median_us(call) for name, call in calls.items()}
            results.append(row)
        channel.close()
        return results
    finally:
        for proc in procs:
            proc.terminate()
        shm.close()
        shm.unlink()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dim", type=int, default=7168, help="hidden width (K2: 7168)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/transport.json")
    args = ap.parse_args()
    results = run(args.dim)
    names = ("grpc", "zmq_tcp", "zmq_ipc", "shm", "socket", "socket_shm")
    rows = [
        [r["batch"], r["bytes"] // 1024, *(r[f"{n}_us"] for n in names)]
        + [r["grpc_us"] / r[f"{n}_us"] for n in names[1:]]
        for r in results
    ]
    headers = ["batch", "KiB", *(f"{n} us" for n in names), *(f"grpc/{n}" for n in names[1:])]
    print(format_table(headers, rows))
    write_json(args.out, {"dim": args.dim, "results": results})
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
