"""grpc.health.v1 probe of one service (the compose healthcheck, like grpc_health_probe): exit 0
when it answers SERVING within the timeout, 1 otherwise. With --deployment it dials with that
description's `security` (mTLS, shared secret). It imports grpc and yaml only, so a probe every
few seconds costs little (loading a whole deployment imports torch: ~2 s of CPU each time).

    python deploy/health_probe.py --target prefill-node:50061 [--deployment deployment.yaml]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import yaml

from services.common.channel import health_status, open_channel
from services.common.security import Security


def security_of(deployment: Path | None) -> Security | None:
    raw = yaml.safe_load(deployment.read_text()) if deployment else None
    if not isinstance(raw, dict) or "security" not in raw:
        return None
    return Security.from_dict(raw["security"], deployment.parent)


async def probe(target: str, timeout_s: float, security: Security | None) -> str:
    async with open_channel(target, security=security) as channel:
        return await health_status(channel, timeout_s=timeout_s)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", required=True, help="host:port of the service")
    ap.add_argument("--deployment", type=Path, help="use this description's security section")
    ap.add_argument("--timeout", type=float, default=3.0)
    args = ap.parse_args()
    try:
        status = asyncio.run(probe(args.target, args.timeout, security_of(args.deployment)))
    except Exception as exc:  # unreachable, refused, timed out: all mean unhealthy
        print(f"{args.target}: {exc.__class__.__name__}", file=sys.stderr)
        return 1
    print(f"{args.target}: {status}")
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
