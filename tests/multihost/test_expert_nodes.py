"""An expert pool spanning two hosts: one DeepSpeed job, a supervisor per node.

Hosts: experts-a (node 0: rank 0, the gRPC port, the rendezvous), experts-b (node 1: rank 1),
prefill-a (prefill-0), decode-a (decode-0). Served tokens equal the in-process reference with the
routed experts split across the hosts. SIGKILL of the rank on experts-b mid-generation: the
request ends within its deadline with a clean error after a correct prefix, every KV block is
freed, both nodes restart into a new generation of the job (new ranks on both hosts, the same
supervisors), and the same request is then served with exactly the reference tokens.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator

import pytest

from tests.e2e.client import generate
from tests.e2e.test_faults import long_prompt
from tests.multihost.cluster import Cluster, build_network
from tests.multihost.reference import Reference
from tests.multihost.test_expert_rank import DEADLINE_S, kill_a_rank_mid_stream_then_recover
from tests.multihost.test_expert_rank import SPEC as RANK_SPEC

# test_expert_rank's deployment with its 2-rank pool split over two hosts (host: the first's).
NODES = [{"host": "experts-a", "ranks": 1}, {"host": "experts-b", "ranks": 1}]
POOL = {k: v for k, v in RANK_SPEC["expert_pool"][0].items() if k != "host"} | {"nodes": NODES}
SPEC = RANK_SPEC | {"expert_pool": [POOL]}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    net = build_network(["experts-a", "experts-b", "prefill-a", "decode-a"])
    try:
        c = Cluster.write(net, tmp_path_factory.mktemp("expert-nodes"), SPEC)
        c.start(["experts-0", "prefill-0", "decode-0"])
        yield c
    finally:
        net.close()


def test_served_tokens_with_the_experts_split_across_hosts(cluster: Cluster) -> None:
    ref = Reference.embedded()
    prompt = long_prompt(2, 12)
    served = asyncio.run(generate(cluster.target("decode-0"), prompt, 24, timeout=DEADLINE_S))[0]
    assert served == ref.ids(prompt, 24)
    assert len(cluster.children("experts-0")) == len(cluster.children("experts-0-node1")) == 1


def test_a_killed_rank_on_the_second_host_restarts_the_job_on_both(cluster: Cluster) -> None:
    before = cluster.children("experts-0") + cluster.children("experts-0-node1")

    def kill() -> None:
        os.kill(cluster.children("experts-0-node1")[0], 9)

    kill_a_rank_mid_stream_then_recover(cluster, kill)
    for name in ("experts-0", "experts-0-node1"):  # the same supervisors, new ranks on both
        assert cluster.procs[name].poll() is None
        assert cluster.children(name) and set(cluster.children(name)).isdisjoint(before)
