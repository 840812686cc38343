"""`k2serve`: run the suite (`up`), write its docker compose files (`compose`), or an in-process
generation (`demo`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from k2model import cli as model_cli
from services import compose
from services.launcher import up

DEFAULT_DEPLOYMENT = Path(__file__).resolve().parents[1] / "deploy" / "local.yaml"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="k2serve", description="Kimi K2 serving suite")
    sub = ap.add_subparsers(dest="command", required=True)
    u = sub.add_parser("up", help="start every service of a deployment and wait for Ctrl-C")
    u.add_argument("--deployment", type=Path, default=DEFAULT_DEPLOYMENT)
    c = sub.add_parser("compose", help="write docker compose files for a deployment")
    c.add_argument("--deployment", type=Path, default=DEFAULT_DEPLOYMENT)
    c.add_argument("--out", type=Path, required=True, help="folder for the generated files")
    c.add_argument("--variant", choices=sorted(compose.VARIANTS), default="cpu")
    sub.add_parser(
        "demo", help="stream an in-process generation (see `k2serve demo -h`)", add_help=False
    )
    args, rest = ap.parse_known_args(argv)
    if args.command == "up":
        up(args.deployment)
    elif args.command == "compose":
        for path in compose.write(args.deployment, args.out, args.variant):
            print(path)
    else:
        model_cli.main(["demo", *rest])


if __name__ == "__main__":
    main()
