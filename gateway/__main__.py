"""`python -m gateway --config deploy/gateway.yaml --deployment deploy/local.yaml`: the REST
gateway on uvicorn (uvloop; h11 with a bounded request head, gateway/http_server.py) in front of
the deployment's tokenizer instances (gateway/backend.py).

The local models' context length and vocabulary come from a tokenizer (Info), waited for up to
STARTUP_WAIT_S; the gateway reads no checkpoint. Its gRPC channels are created inside the
server's event loop. SIGTERM or Ctrl-C: uvicorn stops accepting, finishes in-flight responses for
up to 10 s, then the backend closes its channels.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import uvicorn

from gateway.app import create_app
from gateway.backend import TokenizerBackend
from gateway.config import GatewayConfig
from gateway.grpc_chat import registry_services, start_chat_server
from gateway.http_server import server_config
from gateway.readiness import Readiness
from services.common.processes import SUPERVISOR_STATE_ENV
from services.common.server import run
from services.deployment import Deployment

STARTUP_WAIT_S = 300.0  # a tokenizer that is still loading its vocabulary


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m gateway", description=__doc__)
    ap.add_argument(
        "--config", required=True, help="gateway YAML (keys, profiles, registry, limits)"
    )
    ap.add_argument("--deployment", required=True, help="deployment YAML of the backend services")
    ap.add_argument("--host", help="override listen.host")
    ap.add_argument("--port", type=int, help="override listen.port")
    ap.add_argument("--grpc-port", type=int, help="override listen.grpc_port (0: no gRPC Chat API)")
    return ap.parse_args()


async def main() -> None:
    args = _args()
    deployment = Deployment.load(args.deployment)
    backend = TokenizerBackend(
        [t.target for t in deployment.of_kind("tokenizer")], security=deployment.security
    )
    model = await backend.shape(wait_s=STARTUP_WAIT_S)
    config = GatewayConfig.load(args.config, model)
    backend.timeout_s = config.limits.request_timeout_s
    state = os.environ.get(SUPERVISOR_STATE_ENV)
    app = create_app(
        config,
        backend,
        decode_stats=backend.decode_loads,
        readiness=Readiness(deployment),
        supervisor_state=Path(state) if state else None,
    )
    server = uvicorn.Server(
        server_config(
            app,
            args.host or config.host,
            args.port or config.port,
            config.limits,
            timeout_graceful_shutdown=10,
            log_level="info",
        )
    )
    grpc_port = config.grpc_port if args.grpc_port is None else args.grpc_port
    chat = None
    if grpc_port:
        services = registry_services(config.registry, backend)
        bind = f"{args.host or config.host}:{grpc_port}"
        chat = await start_chat_server(services, model.vocab_size, config.keyring(), bind)
    try:
        await server.serve()
    finally:
        if chat is not None:
            await chat.drain(grace_s=10.0)
        await backend.close()


if __name__ == "__main__":
    run(main)
