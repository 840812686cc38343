"""`python -m services.tokenizer --checkpoint DIR --bind HOST:PORT`: serve k2.v1.Tokenizer.

Prints one line, "tokenizer listening on HOST:PORT", once health says SERVING (a launcher
binding port 0 reads the chosen port from it); SIGTERM / SIGINT drain within --grace-s.
"""

import argparse
from collections.abc import Sequence
from pathlib import Path

from k2model import EMBEDDED_CHECKPOINT
from services.common.server import ServerOptions, run, run_until_signal, start_server
from services.pb.k2.v1 import tokenizer_pb2_grpc
from services.tokenizer.servicer import CHAT_FORMATS, SERVICE_NAME, TokenizerServicer


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    defaults = ServerOptions()
    parser = argparse.ArgumentParser(prog="python -m services.tokenizer", description=__doc__)
    parser.add_argument("--checkpoint", type=Path, default=EMBEDDED_CHECKPOINT)
    parser.add_argument("--bind", default=defaults.bind, help="HOST:PORT; port 0 picks one")
    parser.add_argument(
        "--chat-format",
        choices=CHAT_FORMATS,
        default=None,
        help="default: the checkpoint's template if it ships one, else the native flavor "
        "its vocabulary implies",
    )
    parser.add_argument("--grace-s", type=float, default=defaults.grace_s)
    return parser.parse_args(argv)


async def serve(args: argparse.Namespace) -> None:
    servicer = TokenizerServicer(args.checkpoint, args.chat_format)
    running = await start_server(
        "tokenizer",
        [lambda server: tokenizer_pb2_grpc.add_TokenizerServicer_to_server(servicer, server)],
        [SERVICE_NAME],
        ServerOptions(bind=args.bind, grace_s=args.grace_s),
    )
    running.set_serving()
    print(f"tokenizer listening on {running.address}", flush=True)
    await run_until_signal(running, args.grace_s)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    run(lambda: serve(args))


if __name__ == "__main__":
    main()
