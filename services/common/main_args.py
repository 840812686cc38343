"""Command-line arguments every service's __main__ shares: the deployment and this instance
(for an expert pool spanning nodes, this node's process of it: `Instance.on_node`)."""

from __future__ import annotations

import argparse
import logging

from services.deployment import Deployment, Instance


def parse(kind: str, description: str) -> tuple[Deployment, Instance]:
    ap = argparse.ArgumentParser(prog=f"python -m services.{kind}", description=description)
    ap.add_argument("--deployment", required=True, help="deployment YAML")
    ap.add_argument("--name", required=True, help="this instance's name in the deployment")
    ap.add_argument("--node", type=int, default=0, help="an expert pool's node (default 0)")
    ap.add_argument("--log-level", default="INFO")
    args = ap.parse_args()
    logging.basicConfig(
        level=args.log_level, format=f"%(asctime)s {args.name} %(levelname)s %(message)s"
    )
    dep = Deployment.load(args.deployment)
    me = dep.instance(args.name)
    if me.kind != kind:
        ap.error(f"{args.name} is a {me.kind} instance, not {kind}")
    nodes = len(me.pool_nodes()) if kind == "experts" else 1
    if not 0 <= args.node < nodes:
        ap.error(f"{args.name} has {nodes} node(s); --node {args.node} is not one of them")
    return dep, me.on_node(args.node)
