"""`python -m services.tokenizer --deployment FILE --name NAME`: one tokenizer instance.

It places chats on the deployment's decode instances, polling their Stats from the start.
Prints "NAME listening on HOST:PORT" once health says SERVING; SIGTERM / SIGINT drain.
"""

from __future__ import annotations

import asyncio

from services.common.main_args import parse
from services.common.placement import Placement
from services.common.serve_instance import serve_instance
from services.common.server import run
from services.pb.k2.v1 import decode_pb2_grpc, tokenizer_pb2_grpc
from services.tokenizer.chat_pipeline import ChatPipeline
from services.tokenizer.chat_text import ChatText
from services.tokenizer.servicer import SERVICE_NAME, TokenizerServicer


async def main() -> None:
    dep, me = parse("tokenizer", __doc__)
    text = await asyncio.to_thread(ChatText, dep.checkpoint, dep.chat_format)
    decodes = Placement(
        [(d.name, d.target) for d in dep.of_kind("decode")],
        decode_pb2_grpc.DecodeStub,
        security=dep.security,
    )
    decodes.start()
    servicer = TokenizerServicer(text, ChatPipeline(text, decodes))
    try:
        await serve_instance(
            me,
            lambda server: tokenizer_pb2_grpc.add_TokenizerServicer_to_server(servicer, server),
            SERVICE_NAME,
            security=dep.security,
        )
    finally:
        await decodes.close()


if __name__ == "__main__":
    run(main)
