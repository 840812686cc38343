"""`k2serve`: run the suite (`up`), build its C++ kernels ahead of serving (`build`), write its
docker compose files (`compose`), or an in-process generation (`demo`)."""

from __future__ import annotations

import argparse
import logging
import sys
import time
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
    b = sub.add_parser(
        "build", help="compile k2model's C++ CPU kernels now (else the first start does, ~1 min)"
    )
    b.add_argument(
        "--require", action="store_true", help="fail when they cannot be built (images use it)"
    )
    c = sub.add_parser("compose", help="write docker compose files for a deployment")
    c.add_argument("--deployment", type=Path, default=DEFAULT_DEPLOYMENT)
    c.add_argument("--out", type=Path, required=True, help="folder for the generated files")
    c.add_argument("--variant", choices=sorted(compose.VARIANTS), default="cpu")
    sub.add_parser(
        "demo", help="stream an in-process generation (see `k2serve demo -h`)", add_help=False
    )
    args, rest = ap.parse_known_args(argv)
    if args.command == "up":
        sys.exit(up(args.deployment))
    elif args.command == "build":
        sys.exit(build_kernels(args.require))
    elif args.command == "compose":
        for path in compose.write(args.deployment, args.out, args.variant):
            print(path)
    else:
        model_cli.main(["demo", *rest])


def build_kernels(require: bool) -> int:
    """Build (or find built) the CPU extension, saying what happened and how long it took."""
    from k2model.kernels import cpu_ext

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    started = time.monotonic()
    if cpu_ext.available():
        print(f"k2model CPU kernels ready ({time.monotonic() - started:.0f} s)", flush=True)
        return 0
    print(
        f"k2model CPU kernels not built ({cpu_ext.unavailable_reason()}): ops auto will run "
        "the plain-torch twins, and ops: cpu cannot start",
        flush=True,
    )
    return 1 if require else 0


if __name__ == "__main__":
    main()
