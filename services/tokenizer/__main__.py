"""`python -m services.tokenizer --deployment FILE --name NAME`: one tokenizer instance.

Prints "NAME listening on HOST:PORT" once health says SERVING; SIGTERM / SIGINT drain.
"""

from __future__ import annotations

import asyncio

from services.common.main_args import parse
from services.common.server import ServerOptions, run, run_until_signal, start_server
from services.pb.k2.v1 import tokenizer_pb2_grpc
from services.tokenizer.servicer import SERVICE_NAME, TokenizerServicer


async def main() -> None:
    dep, me = parse("tokenizer", __doc__)
    servicer = await asyncio.to_thread(TokenizerServicer, dep.checkpoint, dep.chat_format)
    running = await start_server(
        me.name,
        [lambda server: tokenizer_pb2_grpc.add_TokenizerServicer_to_server(servicer, server)],
        [SERVICE_NAME],
        ServerOptions(bind=me.target),
    )
    running.set_serving()
    print(f"{me.name} listening on {running.address}", flush=True)
    await run_until_signal(running, grace_s=10.0)


if __name__ == "__main__":
    run(main)
