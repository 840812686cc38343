"""`python -m services.tokenizer --deployment FILE --name NAME`: one tokenizer instance.

Prints "NAME listening on HOST:PORT" once health says SERVING; SIGTERM / SIGINT drain.
"""

from __future__ import annotations

import asyncio

from services.common.main_args import parse
from services.common.serve_instance import serve_instance
from services.common.server import run
from services.pb.k2.v1 import tokenizer_pb2_grpc
from services.tokenizer.servicer import SERVICE_NAME, TokenizerServicer


async def main() -> None:
    dep, me = parse("tokenizer", __doc__)
    servicer = await asyncio.to_thread(TokenizerServicer, dep.checkpoint, dep.chat_format)
    await serve_instance(
        me,
        lambda server: tokenizer_pb2_grpc.add_TokenizerServicer_to_server(servicer, server),
        SERVICE_NAME,
        security=dep.security,
    )


if __name__ == "__main__":
    run(main)
