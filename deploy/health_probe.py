"""grpc.health.v1 probe of one service (the compose healthcheck, like grpc_health_probe): exit 0
when it answers SERVING within the timeout, 1 otherwise. It imports only grpc, so a probe every
few seconds costs little (loading a deployment would import torch: ~2 s of CPU each time).

    python deploy/health_probe.py --target prefill-node:50061
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from services.common.channel import health_status, open_channel  # noqa: E402


async def probe(target: str, timeout_s: float) -> str:
    async with open_channel(target) as channel:
        return await health_status(channel, timeout_s=timeout_s)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", required=True, help="host:port of the service")
    ap.add_argument("--timeout", type=float, default=3.0)
    args = ap.parse_args()
    try:
        status = asyncio.run(probe(args.target, args.timeout))
    except Exception as exc:  # unreachable, refused, timed out: all mean unhealthy
        print(f"{args.target}: {exc.__class__.__name__}", file=sys.stderr)
        return 1
    print(f"{args.target}: {status}")
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
