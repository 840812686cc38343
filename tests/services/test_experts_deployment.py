"""The deployment's `experts: local | remote` setting and its expert_pool instance."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.common.model_host import cpu_threads
from services.deployment import Deployment, DeploymentError

ROOT = Path(__file__).resolve().parents[2]


def minimal(**extra) -> dict:
    return {
        "tokenizer": [{"port": 1}],
        "prefill": [{"port": 2}],
        "decode": [{"port": 3}],
        **extra,
    }


def pool(**extra) -> dict:
    return {"expert_pool": [{"port": 4, "ranks": 2, "master_port": 5, **extra}]}


def test_local_is_the_default_and_has_no_pool() -> None:
    dep = Deployment.from_dict(minimal())
    assert dep.experts == "local" and dep.remote_experts is None and not dep.of_kind("experts")


def test_remote_pool_instance() -> None:
    dep = Deployment.from_dict(minimal(experts="remote", **pool()))
    inst = dep.remote_experts
    assert inst is not None and inst is dep.instance("experts-0")
    assert (inst.kind, inst.target, inst.ranks, inst.master_port) == (
        "experts",
        "127.0.0.1:4",
        2,
        5,
    )
    assert dep.instances[0] is inst  # started first by the launcher


def test_shipped_local_deployment_runs_two_remote_ranks() -> None:
    dep = Deployment.load(ROOT / "deploy" / "local.yaml")
    inst = dep.remote_experts
    assert inst is not None and inst.ranks == 2 and inst.master_port > 0


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (minimal(experts="remote"), "exactly one expert_pool"),
        (minimal(experts="sometimes", **pool()), "local or remote"),
        (minimal(**pool()), "experts is local"),
        (minimal(experts="remote", **pool(master_port=3)), "collides"),
        (minimal(experts="remote", **pool(ranks=0)), "ranks and master_port"),
        (minimal(experts="remote", **pool(master_port=0)), "ranks and master_port"),
        (
            minimal(experts="remote", **pool(colour=1)),
            r"expert_pool\[0\]\.colour: not a setting of expert_pool",
        ),
        (
            minimal(experts="remote", expert_pool=[pool()["expert_pool"][0], {"port": 6}]),
            "exactly one expert_pool",
        ),
    ],
)
def test_bad_expert_settings(raw: dict, message: str) -> None:
    with pytest.raises(DeploymentError, match=message):
        Deployment.from_dict(raw)


def test_rank_threads_share_the_cores_with_model_processes(monkeypatch) -> None:
    """Cores are split over every compute process on the host: model instances and ranks."""
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    dep = Deployment.from_dict(minimal(experts="remote", **pool()))
    processes = (
        len(dep.of_kind("prefill")) + len(dep.of_kind("decode")) + dep.instance("experts-0").ranks
    )
    assert cpu_threads(dep, dep.instance("experts-0")) == max(1, 8 // processes)
    assert cpu_threads(dep, dep.of_kind("decode")[0]) == max(1, 8 // processes)
    pinned = Deployment.from_dict(minimal(experts="remote", model={"threads": 3}, **pool()))
    assert cpu_threads(pinned, pinned.instance("experts-0")) == 3


def spanning(**extra) -> dict:
    """A pool of 3 ranks over two hosts: 2 on node a (rank 0, the gRPC port), 1 on node b."""
    nodes = [{"host": "a", "ranks": 2}, {"host": "b", "ranks": 1}]
    return minimal(
        hosts={"local": "127.0.0.1", "a": "10.0.0.1", "b": "10.0.0.2"},
        experts="remote",
        expert_pool=[{"port": 4, "master_port": 5, "nodes": nodes, **extra}],
    )


def test_a_pool_spanning_nodes_runs_one_process_per_node() -> None:
    dep = Deployment.from_dict(spanning())
    inst = dep.instance("experts-0")
    assert (inst.host, inst.target, inst.ranks) == ("a", "10.0.0.1:4", 3)
    assert [(n.host, n.address, n.ranks, n.first_rank) for n in inst.pool_nodes()] == [
        ("a", "10.0.0.1", 2, 0),
        ("b", "10.0.0.2", 1, 2),
    ]
    procs = dep.processes()
    assert [p.process_name for p in procs[:2]] == ["experts-0", "experts-0-node1"]
    node1 = procs[1]
    assert (node1.name, node1.node, node1.host, node1.address) == ("experts-0", 1, "b", "10.0.0.2")
    assert [p.kind for p in procs[2:]] == ["tokenizer", "prefill", "decode"]
    assert Deployment.from_dict(spanning(host="a", ranks=3)).instance("experts-0").ranks == 3


def test_threads_count_only_the_ranks_on_this_host(monkeypatch) -> None:
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    dep = Deployment.from_dict(spanning())
    node0, node1 = dep.processes()[:2]
    assert cpu_threads(dep, node0) == 4  # 2 ranks on a; the model instances are on local
    assert cpu_threads(dep, node1) == 8  # 1 rank on b


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"host": "b"}, "must be the first node's"),
        ({"ranks": 4}, "ranks 4 but its nodes have 3"),
        ({"nodes": []}, "non-empty list"),
        ({"nodes": [{"host": "a"}]}, r"nodes\[0\] must be \{host, ranks\}"),
        ({"nodes": [{"host": "c", "ranks": 1}]}, "not in hosts"),
        ({"nodes": [{"host": "a", "ranks": 0}]}, "at least one rank"),
        ({"nodes": [{"host": "a", "ranks": 1}, {"host": "a", "ranks": 1}]}, "one node per host"),
    ],
)
def test_bad_pool_nodes(extra: dict, message: str) -> None:
    with pytest.raises(DeploymentError, match=message):
        Deployment.from_dict(spanning(**extra))


def test_only_pools_take_nodes() -> None:
    raw = minimal(hosts={"local": "127.0.0.1"})
    raw["decode"] = [{"port": 3, "nodes": [{"host": "local", "ranks": 1}]}]
    with pytest.raises(DeploymentError, match="decode\\[0\\]\\.nodes: not a setting of decode"):
        Deployment.from_dict(raw)


def test_decode_splits_steps_only_where_the_pool_has_its_own_cores() -> None:
    def split(decode: dict, **extra) -> int | None:
        raw = spanning(**extra) | {"decode": [{"port": 3, **decode}]}
        dep = Deployment.from_dict(raw)
        return dep.micro_batch_min(dep.of_kind("decode")[0])

    assert split({}) is None  # auto, decode on `local`, the pool on a and b: the default split
    assert split({"host": "b"}) == 0  # a pool node shares decode's host (and its cores)
    assert split({"host": "b", "micro_batches": 4}) == 4
    assert split({"micro_batches": "off"}) == 0
    grpc = Deployment.from_dict(spanning() | {"expert_transport": "grpc"})
    assert grpc.micro_batch_min(grpc.of_kind("decode")[0]) == 0  # answered in the call
    local = Deployment.from_dict(minimal())
    assert local.micro_batch_min(local.of_kind("decode")[0]) == 0
    for bad in (0, -1, "sometimes", True):
        with pytest.raises(DeploymentError, match=r"decode\[0\]\.micro_batches"):
            split({"micro_batches": bad})
    with pytest.raises(DeploymentError, match="not a setting of prefill"):
        Deployment.from_dict(minimal(prefill=[{"port": 2, "micro_batches": 4}]))


def test_busy_polling_is_off_by_default_and_bounded() -> None:
    assert Deployment.from_dict(minimal()).expert_busy_poll_us == 0
    dep = Deployment.from_dict(minimal(experts="remote", expert_busy_poll_us=500, **pool()))
    assert dep.expert_busy_poll_us == 500
    for bad in (-1, 100_001, 1.5, "fast", True):
        with pytest.raises(DeploymentError, match="expert_busy_poll_us"):
            Deployment.from_dict(minimal(expert_busy_poll_us=bad))
