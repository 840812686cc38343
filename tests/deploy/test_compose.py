"""The committed compose files against the deployment descriptions they come from.

Each layout (a description, its folder under deploy/compose, the image variant) is checked for:
no drift from `k2serve compose`; every process exactly once, on its host (an expert pool
spanning nodes: one per node), running the launcher's command on the containers' view of the
same deployment; the private network with only the
gateway published; healthchecks; environment; restart policies; read-only mounts; GPU
reservations (CUDA variant only); and, where a docker compose client is installed (no daemon
needed), `docker compose config`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import yaml

from services import cli, compose
from services.deployment import Deployment, Instance
from services.launcher import command

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
LAYOUTS = {
    "local": ("local.yaml", "cpu"),
    "node": ("node.yaml", "cuda"),
    "cluster": ("cluster.yaml", "cuda"),
    "gpu": ("gpu.yaml", "cuda"),
}
IN_CONTAINER = Path("/etc/k2serve/deployment.yaml")


def layout(name: str) -> tuple[Deployment, Path, str]:
    description, variant = LAYOUTS[name]
    return Deployment.load(DEPLOY / description), DEPLOY / "compose" / name, variant


def files(out: Path) -> dict[str, dict[str, Any]]:
    """host -> its compose file."""
    return {
        p.name.removeprefix("compose.").removesuffix(".yaml"): yaml.safe_load(p.read_text())
        for p in sorted(out.glob("compose.*.yaml"))
    }


def service_of(dep: Deployment, out: Path, inst: Instance) -> dict[str, Any]:
    return files(out)[inst.host]["services"][inst.process_name]


def host_path(out: Path, volume: str) -> tuple[Path, str, str]:
    """(resolved host path, container path, mode) of a short-syntax volume."""
    source, target, mode = volume.split(":")
    return (out / source).resolve(), target, mode


@pytest.mark.parametrize("name", LAYOUTS)
def test_committed_files_are_what_the_description_generates(name: str) -> None:
    description, variant = LAYOUTS[name]
    out = DEPLOY / "compose" / name
    expected = compose.render(DEPLOY / description, out, variant)
    assert sorted(p.name for p in out.iterdir()) == sorted(expected)
    for file, text in expected.items():
        assert (out / file).read_text() == text, f"{file} drifted: run k2serve compose"


@pytest.mark.parametrize("name", LAYOUTS)
def test_every_instance_runs_once_on_its_host_with_the_same_settings(name: str) -> None:
    dep, out, _ = layout(name)
    by_host = files(out)
    assert set(by_host) == {i.host for i in dep.processes()}
    view = Deployment.load(out / "deployment.yaml")
    assert view.checkpoint == (dep.checkpoint if name == "local" else Path("/checkpoint"))
    assert (view.dtype, view.fp8_resident, view.threads, view.experts) == (
        dep.dtype,
        dep.fp8_resident,
        dep.threads,
        dep.experts,
    )
    for inst in dep.processes():
        homes = [h for h, f in by_host.items() if inst.process_name in f["services"]]
        assert homes == [inst.host]
        inside = view.instance(inst.name).on_node(inst.node)
        same = ("kind", "port", "kv_blocks", "block_size", "max_running", "max_queue")
        same += ("chunk_tokens", "max_batch_tokens", "ranks", "master_port", "node")
        assert [getattr(inside, f) for f in same] == [getattr(inst, f) for f in same]
        if inst.kind == "experts":
            nodes = [(n.host, n.ranks, n.first_rank) for n in inst.pool_nodes()]
            assert [(n.host, n.ranks, n.first_rank) for n in inside.pool_nodes()] == nodes
        # Co-located instances share a host in the containers' view too (CPU threads are split
        # among a host's model processes); a gateway binds every interface of its container.
        expected_address = "0.0.0.0" if inst.kind == "gateway" else inst.host
        assert inside.address == expected_address
        assert service_of(dep, out, inst)["command"] == command(inside, IN_CONTAINER, "python")


@pytest.mark.parametrize("name", LAYOUTS)
def test_a_private_network_with_only_the_gateway_published(name: str) -> None:
    dep, out, _ = layout(name)
    several = len({i.host for i in dep.processes()}) > 1
    for host, spec in files(out).items():
        internal = spec["networks"]["internal"]
        assert internal == (
            {"external": True, "name": "k2serve-internal"} if several else {"internal": True}
        )
        here = [i for i in dep.processes() if i.host == host]
        pod = spec["services"].get(host)
        backends = [i for i in here if i.kind != "gateway"]
        if backends:
            assert (
                pod["hostname"] == host and pod["networks"] == ["internal"] and "ports" not in pod
            )
            dialed = [i.port for i in backends if not i.node]  # a pool's further nodes: none
            dialed += [i.master_port for i in backends if i.kind == "experts" and not i.node]
            assert sorted(map(int, pod["expose"])) == sorted(dialed)
        for inst in here:
            service = spec["services"][inst.process_name]
            if inst.kind == "gateway":
                assert service["networks"] == ["internal", "public"]
                assert f"{inst.port}:{inst.port}" in service["ports"]
            else:
                assert service["network_mode"] == f"service:{host}"
                assert "ports" not in service and "networks" not in service
        published = [n for n, s in spec["services"].items() if "ports" in s]
        assert published == [i.name for i in here if i.kind == "gateway"]


@pytest.mark.parametrize("name", LAYOUTS)
def test_healthchecks_restart_policies_and_environment(name: str) -> None:
    dep, out, _ = layout(name)
    for inst in dep.processes():
        service = service_of(dep, out, inst)
        check = service["healthcheck"]
        if inst.kind == "gateway":
            assert f"http://127.0.0.1:{inst.port}/health" in check["test"][-1]
        else:  # a pool's further nodes probe the pool (on its node 0) they serve in
            probe = ["python", "/opt/k2serve/deploy/health_probe.py"]
            target = [
                "--target",
                f"{inst.pool_nodes()[0].host if inst.node else inst.host}:{inst.port}",
            ]
            security = ["--deployment", str(IN_CONTAINER)]  # it reads the security section
            assert check["test"] == ["CMD", *probe, *target, *security]
        assert check["retries"] >= 1 and check["start_period"].endswith("s")
        assert service["restart"] == "unless-stopped"
        assert service["environment"]["PYTHONUNBUFFERED"] == "1"
    for spec in files(out).values():
        assert all(s["restart"] == "unless-stopped" for s in spec["services"].values())


@pytest.mark.parametrize("name", LAYOUTS)
def test_the_gateway_takes_its_api_keys_from_the_node_environment(name: str) -> None:
    dep, out, _ = layout(name)
    for inst in dep.of_kind("gateway"):
        raw = yaml.safe_load(inst.config.read_text())
        wanted = {k["key_env"] for k in raw["keys"] if "key_env" in k}
        env = service_of(dep, out, inst)["environment"]
        for var in wanted:
            assert env[var].startswith(f"${{{var}:?")  # required: compose refuses when unset
        assert set(env) == {"PYTHONUNBUFFERED", *wanted}


@pytest.mark.parametrize("name", LAYOUTS)
def test_configuration_and_checkpoint_are_mounted_read_only_and_never_into_the_gateway(
    name: str,
) -> None:
    dep, out, _ = layout(name)
    for inst in dep.processes():
        mounts = {}
        for volume in service_of(dep, out, inst)["volumes"]:
            source, target, mode = host_path(out, volume)
            mounts[target] = (source, mode)
        assert all(mode == "ro" for _, mode in mounts.values())
        assert mounts["/etc/k2serve/deployment.yaml"][0] == out / "deployment.yaml"
        reads = name != "local" and inst.kind != "gateway"  # the embedded one is in the image
        if reads:
            assert mounts["/checkpoint"][0] == dep.checkpoint
        else:  # the gateway keeps the public API only: no checkpoint, no tokenizer
            assert "/checkpoint" not in mounts
        if inst.config is not None:
            assert mounts[f"/etc/k2serve/{inst.name}.yaml"][0] == inst.config
        files = dep.security.files() if dep.security else {}
        inside = Deployment.load(out / "deployment.yaml").security
        for key, path in files.items():  # where the containers' description says they are
            assert mounts[str(getattr(inside, key))][0] == path
        assert len(mounts) == 1 + reads + len(files) + (inst.config is not None)


@pytest.mark.parametrize("name", LAYOUTS)
def test_gpu_reservations_only_in_the_cuda_variant(name: str) -> None:
    dep, out, variant = layout(name)
    for host, spec in files(out).items():
        used: list[str] = []
        named = set()  # GPUs the description names (cuda:N): instances may share those
        for service_name, service in spec["services"].items():
            devices = service.get("deploy", {}).get("resources", {}).get("reservations", {})
            devices = devices.get("devices", [])
            inst = next((i for i in dep.processes() if i.process_name == service_name), None)
            wanted = 0
            if variant == "cuda" and inst is not None:
                ranks = inst.pool_nodes()[inst.node].ranks  # an expert pool's ranks on this node
                wanted = {"prefill": 1, "decode": 1, "experts": ranks}.get(inst.kind, 0)
            assert sum(len(d["device_ids"]) for d in devices) == wanted, service_name
            for d in devices:
                assert d["driver"] == "nvidia" and d["capabilities"] == ["gpu"]
                used += d["device_ids"]
            if inst is not None and inst.device.startswith("cuda:"):
                assert [d["device_ids"][0] for d in devices] == [inst.device.split(":")[1]]
                named.add(inst.device.split(":")[1])
        unnamed = [g for g in used if g not in named]
        assert len(unnamed) == len(set(unnamed)), f"{host}: a GPU reserved twice"


@pytest.mark.parametrize("name", LAYOUTS)
def test_each_container_computes_on_what_it_reserved(name: str) -> None:
    """Inside a container its reserved GPU is cuda:0 (a pool's ranks spread over theirs)."""
    dep, out, variant = layout(name)
    view = Deployment.load(out / "deployment.yaml")
    for inst in dep.processes():
        if inst.kind in ("prefill", "decode", "experts"):
            inside = view.instance(inst.name)
            gpu = {"experts": "cuda"}.get(inst.kind, "cuda:0")
            assert inside.device == (gpu if variant == "cuda" else "cpu"), inst.name


def test_scaling_decode_is_a_change_in_the_description(tmp_path: Path) -> None:
    raw = yaml.safe_load((DEPLOY / "node.yaml").read_text())
    raw["decode"].append({"name": "decode-2", "host": "node", "port": 50073, "kv_blocks": 1024})
    raw["gateway"][0]["config"] = str(DEPLOY / raw["gateway"][0]["config"])
    description = tmp_path / "node.yaml"
    description.write_text(yaml.safe_dump(raw))
    out = tmp_path / "compose"
    cli.main(["compose", "--deployment", str(description), "--out", str(out), "--variant", "cuda"])
    spec = yaml.safe_load((out / "compose.node.yaml").read_text())
    decode = spec["services"]["decode-2"]
    assert decode["command"][-2:] == ["--name", "decode-2"]
    (device,) = decode["deploy"]["resources"]["reservations"]["devices"]
    taken = [
        i
        for n, s in spec["services"].items()
        if n != "decode-2" and "deploy" in s
        for d in s["deploy"]["resources"]["reservations"]["devices"]
        for i in d["device_ids"]
    ]
    assert len(device["device_ids"]) == 1 and device["device_ids"][0] not in taken
    assert "50073" in spec["services"]["node"]["expose"]
    assert Deployment.load(out / "deployment.yaml").instance("decode-2").kv_blocks == 1024


def test_a_host_named_like_an_instance_is_refused(tmp_path: Path) -> None:
    """Each host's pod is a compose service named after the host, beside the instances."""
    raw = {
        "hosts": {"decode-0": "127.0.0.1"},
        "tokenizer": [{"name": "tokenizer-0", "host": "decode-0", "port": 50051}],
        "prefill": [{"name": "prefill-0", "host": "decode-0", "port": 50061}],
        "decode": [{"name": "decode-0", "host": "decode-0", "port": 50071}],
    }
    description = tmp_path / "d.yaml"
    description.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match="double as instance names"):
        compose.render(description, tmp_path / "out")


def _compose_client() -> list[str] | None:
    """`docker compose` (v2 plugin) or `docker-compose` (v1): both validate without a daemon."""
    for cmd in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(cmd[0]) is None:
            continue
        done = subprocess.run([*cmd, "version"], capture_output=True, timeout=60)
        if done.returncode == 0:
            return cmd
    return None


@pytest.mark.parametrize("name", LAYOUTS)
def test_docker_compose_config_accepts_every_file(name: str) -> None:
    client = _compose_client()
    if client is None:
        pytest.skip("no docker compose client installed (apt-get install docker-compose)")
    dep, out, _ = layout(name)
    env = dict(os.environ)
    for inst in dep.of_kind("gateway"):
        raw = yaml.safe_load(inst.config.read_text())
        env |= {k["key_env"]: "sk-test-value" for k in raw["keys"] if "key_env" in k}
    env.pop("DOCKER_HOST", None)
    for file in sorted(out.glob("compose.*.yaml")):
        done = subprocess.run(
            [*client, "-f", file.name, "config", "-q"],
            cwd=out,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, f"{file}: {done.stderr}"


def test_no_committed_compose_set_publishes_an_unauthenticated_port() -> None:
    """Regression: the gateway's gRPC Chat port was published on 0.0.0.0 with
    no authentication. Every port a committed compose file publishes must be a gateway's REST or
    gRPC Chat port (both check an API key on every call, tests/gateway/test_grpc_chat_auth.py),
    behind a configuration that holds keys."""
    sets = sorted(p for p in (DEPLOY / "compose").iterdir() if p.is_dir())
    assert {p.name for p in sets} >= set(LAYOUTS)
    for out in sets:
        dep = Deployment.load(out / "deployment.yaml")
        gateways = {i.process_name: i for i in dep.of_kind("gateway")}
        for file in sorted(out.glob("compose.*.yaml")):
            for name, service in yaml.safe_load(file.read_text())["services"].items():
                published = [str(p).split(":")[-1] for p in service.get("ports", [])]
                if not published:
                    continue
                assert name in gateways, f"{file.name}: {name} publishes {published}"
                inst = gateways[name]
                mounts = {t: src for src, t, _ in map(partial(host_path, out), service["volumes"])}
                raw = yaml.safe_load(mounts[str(inst.config)].read_text())
                assert raw["keys"], f"{file.name}: {name} has no API keys"
                allowed = {inst.port, int(raw["listen"].get("grpc_port", 0))} - {0}
                assert {int(p) for p in published} <= allowed, f"{file.name}: {name}"
