"""The deployment description: which services run where, how many, on which checkpoint.

One YAML file drives the local launcher (`k2serve up`), every service's own settings and peer
list, and the docker compose files. Peers always come from here, never from a request.

    checkpoint: embedded            # or a checkpoint directory
    hosts: {local: 127.0.0.1}       # host name -> address services bind to and dial
    model: {dtype: auto, fp8_resident: false, chat_format: auto, threads: auto, kv_dtype: auto}
    tokenizer: [{name: tokenizer-0, host: local, port: 50051}]
    prefill:   [{name: prefill-0, host: local, port: 50061, kv_blocks: auto}]
    decode:    [{name: decode-0, host: local, port: 50071, kv_cache_gib: 2, max_running: 64}]
    experts: remote                 # or local (default): where prefill/decode run routed experts
    expert_transport: dataplane     # or dataplane-tcp, grpc: how their rows reach the pool
    expert_busy_poll_us: 0          # data plane: spin this long for the next frames (below)
    expert_pool: [{name: experts-0, host: local, port: 50081, ranks: 2, master_port: 29500}]
    gateway:   [{name: gateway-0, host: local, port: 8000, config: gateway.yaml}]
    security: {ca: ca.pem, cert: internal.pem, key: internal.key, secret_file: secret}  # optional

Each kind takes its own settings (KIND_KEYS) and a key it does not use is an error naming its
path (`tokenizer[0].kv_blocks: not a setting of tokenizer instances`). A prefill or decode KV
pool is `kv_blocks` blocks of `block_size` tokens, or `auto` (the default): sized from the memory
the process may use (`kv_cache_gib`, else a share of the host's; services/common/kv_sizing.py).
`threads` on an instance overrides model.threads for that process, `dtype` on a prefill or
decode instance model.dtype (prefill in bfloat16 beside an fp32 decode: docs/performance.md).
`device` (auto | cpu | cuda | cuda:N; auto: the GPU the process sees, else the CPU) and `ops`
(auto | torch | cpu | triton: k2model/kernels/ops.py) on a prefill, decode or experts instance fix
where and with which kernels it computes; one that cannot be had here fails that process's start.
model.kv_dtype is the latent cache's dtype (auto: model.dtype's; bfloat16 under an fp32 model
halves KV memory and transfer but rounds the latents), the same on prefill and decode because the
cache travels between them.

With `experts: remote` exactly one instance of kind `experts` (under the key `expert_pool`) is
required: one DeepSpeed job of `ranks` processes on its host, rendezvous at master_port. A pool
may span nodes: `nodes: [{host: expert-a, ranks: 8}, {host: expert-b, ranks: 8}]` runs one
supervisor per node (`Deployment.processes`), node 0 on the instance's host with rank 0, the
gRPC port and the rendezvous; `ranks` is then their sum.
A `gateway` (optional, HTTP) serves the REST API and the chat page in front of this deployment;
its `config` (keys, profiles, registry, limits: gateway/config.py) is resolved against this file,
and the instance's host and port replace the config's `listen`. `security` turns on mTLS and/or
a shared-secret check on every internal gRPC call (services/common/security.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from k2model import EMBEDDED_CHECKPOINT
from services.common.security import Security

if TYPE_CHECKING:
    import torch

KINDS = ("experts", "tokenizer", "prefill", "decode", "gateway")  # start order: experts first
REQUIRED = ("tokenizer", "prefill", "decode")
_SECTION = {"experts": "expert_pool"}  # the YAML key of a kind, where it is not the kind itself
EXPERTS_MODES = ("local", "remote")
EXPERT_TRANSPORTS = ("dataplane", "dataplane-tcp", "grpc")
DTYPES = ("auto", "float32", "bfloat16")  # model.dtype, an instance's dtype, model.kv_dtype


class DeploymentError(ValueError):
    """A deployment description that is malformed or inconsistent."""


@dataclass(frozen=True)
class PoolNode:
    """One host's share of an expert pool: ranks first_rank .. first_rank + ranks - 1."""

    host: str
    address: str
    ranks: int
    first_rank: int


@dataclass(frozen=True)
class Instance:
    """One service instance. Which settings a kind takes: KIND_KEYS (others are refused)."""

    kind: str
    name: str
    host: str
    address: str  # the host's address
    port: int
    kv_blocks: int | None = None  # None ("auto"): sized from memory (services/common/kv_sizing.py)
    kv_cache_gib: float | None = None  # with kv_blocks auto: the KV pool's memory, not a share
    threads: int = 0  # CPU threads of this model process; 0: the deployment's model.threads
    dtype: str = (
        ""  # prefill/decode: this process's compute dtype; "": the deployment's model.dtype
    )
    device: str = "auto"  # prefill/decode/experts: auto | cpu | cuda | cuda:N (k2model/runtime.py)
    ops: str = "auto"  # prefill/decode/experts: auto | torch | cpu | triton (kernels/ops.py)
    block_size: int = 16
    max_running: int = 64
    max_queue: int = 256
    chunk_tokens: int = 512
    max_batch_tokens: int = 4096  # prefill: tokens per step over all prompts
    # decode, with remote experts over the data plane: sequences per micro-batch before a step
    # is split in two (0: never; None, "auto": k2model.runner.MICRO_BATCH_MIN when no pool node
    # shares this instance's host - on a shared host the split only adds hops on the same cores)
    micro_batches: int | None = None
    ranks: int = 1  # experts: processes in the DeepSpeed job
    master_port: int = 0  # experts: the job's rendezvous port on its host
    config: Path | None = None  # gateway: its YAML (required there, refused elsewhere)
    nodes: tuple[PoolNode, ...] = ()  # experts: the hosts of a pool spanning several
    node: int = 0  # experts: which of `pool_nodes` this process runs (host/address are its)

    @property
    def target(self) -> str:
        return f"{self.address}:{self.port}"

    def pool_nodes(self) -> tuple[PoolNode, ...]:
        """The hosts of an expert pool: its `nodes`, or its own host with every rank."""
        return self.nodes or (PoolNode(self.host, self.address, self.ranks, 0),)

    def on_node(self, node: int) -> Instance:
        """The process of this pool that runs on node `node` (node 0: the instance itself)."""
        if node == 0:
            return self
        n = self.pool_nodes()[node]
        return replace(self, node=node, host=n.host, address=n.address)

    @property
    def process_name(self) -> str:
        return self.name if self.node == 0 else f"{self.name}-node{self.node}"


@dataclass(frozen=True)
class Deployment:
    checkpoint: Path
    dtype: str
    fp8_resident: bool
    instances: tuple[Instance, ...]
    chat_format: str | None = None  # None: the checkpoint's own template, else its native flavor
    threads: int = 0  # CPU threads per model process; 0: cores split among this host's instances
    kv_dtype: str = "auto"  # the latent KV cache's dtype; auto: the model's (docs/performance.md)
    experts: str = "local"  # "remote": routed experts run on the experts instance
    # remote experts' rows: "dataplane" straight to each rank (services/experts/dataplane.py),
    # through shared memory to ranks on the caller's host; "dataplane-tcp" the same, never
    # through shared memory; or "grpc", one Compute call per layer through rank 0 (its
    # collectives; the slow twin)
    expert_transport: str = "dataplane"
    # data plane: ranks spin this long for a caller's next request, and callers for a rank's
    # reply, before sleeping (0: never). Saves the wake-up of a sleeping process where each
    # has a core of its own; costs those cores' cycles.
    expert_busy_poll_us: int = 0
    security: Security | None = None  # mTLS and/or a shared secret on internal gRPC

    @property
    def remote_experts(self) -> Instance | None:
        """The expert pool prefill and decode call, when `experts: remote`."""
        return self.of_kind("experts")[0] if self.experts == "remote" else None

    def micro_batch_min(self, me: Instance) -> int | None:
        """Sequences per micro-batch before `me`'s decode steps split in two (0: never; None:
        k2model.runner.MICRO_BATCH_MIN)."""
        pool = self.remote_experts
        if pool is None or self.expert_transport == "grpc":
            return 0  # nothing to overlap: the experts are in-process or answer in the call
        if me.micro_batches is not None:
            return me.micro_batches
        shared = any(node.address == me.address for node in pool.pool_nodes())
        return 0 if shared else None

    def torch_kv_dtype(self) -> torch.dtype:
        """The KV cache's dtype, the same in every prefill and decode process (the cache travels
        between them): model.kv_dtype, and for auto the deployment's model dtype, whatever an
        instance computes in."""
        import torch

        from k2model.runtime import default_dtype

        if self.kv_dtype != "auto":
            return getattr(torch, self.kv_dtype)
        return self.torch_dtype() or default_dtype()

    def torch_dtype(self, instance: Instance | None = None) -> torch.dtype | None:
        """The compute dtype of `instance` (its own `dtype`, else model.dtype); None = the
        model's default for the device. (torch is imported here: the gateway reads deployments
        and never loads it.)"""
        import torch

        name = instance.dtype if instance is not None and instance.dtype else self.dtype
        return None if name == "auto" else getattr(torch, name)

    def of_kind(self, kind: str) -> list[Instance]:
        return [i for i in self.instances if i.kind == kind]

    def processes(self) -> list[Instance]:
        """What runs, in start order: every instance, then the other nodes of expert pools that
        span several (each node's supervisor and ranks on that node's host)."""
        out = []
        for i in (i for kind in KINDS for i in self.of_kind(kind)):
            out += [i.on_node(k) for k in range(len(i.pool_nodes()) if i.kind == "experts" else 1)]
        return out

    def instance(self, name: str) -> Instance:
        for i in self.instances:
            if i.name == name:
                return i
        raise DeploymentError(
            f"no instance named {name!r} (have {[i.name for i in self.instances]})"
        )

    @classmethod
    def load(cls, path: str | Path) -> Deployment:
        try:
            raw = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as e:
            raise DeploymentError(f"{path}: {e}") from e
        return cls.from_dict(raw, base=Path(path).parent)

    @classmethod
    def from_dict(cls, raw: Any, base: Path = Path(".")) -> Deployment:
        if not isinstance(raw, dict):
            raise DeploymentError("a deployment must be a mapping")
        known = {
            "checkpoint",
            "hosts",
            "model",
            "experts",
            "expert_transport",
            "expert_busy_poll_us",
            "security",
        }
        known |= set(map(_section, KINDS))
        unknown = set(raw) - known
        if unknown:
            raise DeploymentError(f"unknown deployment keys: {sorted(unknown)}")
        hosts = raw.get("hosts") or {"local": "127.0.0.1"}
        model = raw.get("model") or {}
        ckpt = raw.get("checkpoint", "embedded")
        checkpoint = EMBEDDED_CHECKPOINT if ckpt == "embedded" else (base / str(ckpt)).resolve()
        instances = tuple(
            _instance(kind, i, entry, hosts, base)
            for kind in KINDS
            for i, entry in enumerate(raw.get(_section(kind)) or [])
        )
        unknown = set(model) - {"dtype", "fp8_resident", "chat_format", "threads", "kv_dtype"}
        if unknown:
            raise DeploymentError(f"unknown model keys: {sorted(unknown)}")
        chat, threads = model.get("chat_format", "auto"), model.get("threads", "auto")
        dep = cls(
            checkpoint,
            str(model.get("dtype", "auto")),
            bool(model.get("fp8_resident", False)),
            instances,
            chat_format=None if chat == "auto" else str(chat),
            threads=0 if threads == "auto" else int(threads),
            kv_dtype=str(model.get("kv_dtype", "auto")),
            experts=str(raw.get("experts", "local")),
            expert_transport=str(raw.get("expert_transport", "dataplane")),
            expert_busy_poll_us=_busy_poll(raw.get("expert_busy_poll_us", 0)),
            security=Security.from_dict(raw["security"], base) if "security" in raw else None,
        )
        _check(dep)
        return dep


_COMMON_KEYS = ("name", "host", "port")
_KV_KEYS = ("kv_blocks", "kv_cache_gib", "block_size", "max_queue", "threads")
_RUNTIME_KEYS = ("dtype", "device", "ops")
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")
OPS = ("auto", "torch", "cpu", "triton")
# The settings each kind takes; any other key in its entry is refused with the key's path.
KIND_KEYS: dict[str, tuple[str, ...]] = {
    "tokenizer": _COMMON_KEYS,
    "prefill": (*_COMMON_KEYS, *_KV_KEYS, *_RUNTIME_KEYS, "chunk_tokens", "max_batch_tokens"),
    "decode": (*_COMMON_KEYS, *_KV_KEYS, *_RUNTIME_KEYS, "max_running", "micro_batches"),
    "experts": (*_COMMON_KEYS, "ranks", "master_port", "nodes", "threads", "device", "ops"),
    "gateway": (*_COMMON_KEYS, "config"),
}
_TEXT_FIELDS = ("name", "host", "config", "dtype", "device", "ops", "micro_batches")
_OPTIONAL = {"kv_blocks": int, "kv_cache_gib": float}  # absent or "auto": None


def _section(kind: str) -> str:
    return _SECTION.get(kind, kind)


def _instance(kind: str, index: int, entry: Any, hosts: dict[str, str], base: Path) -> Instance:
    where = f"{_section(kind)}[{index}]"
    if not isinstance(entry, dict):
        raise DeploymentError(f"{where} must be a mapping")
    for key in entry:
        if key not in KIND_KEYS[kind]:
            takes = ", ".join(KIND_KEYS[kind])
            raise DeploymentError(
                f"{where}.{key}: not a setting of {_section(kind)} instances (they take {takes})"
            )
    nodes = _pool_nodes(where, entry, hosts) if "nodes" in entry else ()
    host = entry.get("host", nodes[0].host if nodes else "local")
    if nodes and host != nodes[0].host:
        raise DeploymentError(f"{where}: host {host!r} must be the first node's, {nodes[0].host!r}")
    if host not in hosts:
        raise DeploymentError(f"{where}: host {host!r} is not in hosts {sorted(hosts)}")
    if "port" not in entry:
        raise DeploymentError(f"{where}: port is required")
    if kind == "gateway" and "config" not in entry:
        raise DeploymentError(f"{where}.config: a gateway needs a config file")
    config = (base / str(entry["config"])).resolve() if "config" in entry else None
    values = {
        k: _number(where, k, v) for k, v in entry.items() if k not in (*_TEXT_FIELDS, "nodes")
    }
    if nodes:
        total = sum(n.ranks for n in nodes)
        if values.setdefault("ranks", total) != total:
            raise DeploymentError(f"{where}: ranks {values['ranks']} but its nodes have {total}")
    name = str(entry.get("name", f"{kind}-{index}"))
    dtype = str(entry.get("dtype", ""))
    if "dtype" in entry and dtype not in DTYPES:
        raise DeploymentError(f"{where}.dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
    device, ops = str(entry.get("device", "auto")), str(entry.get("ops", "auto"))
    if not DEVICE_PATTERN.fullmatch(device):
        raise DeploymentError(f"{where}.device: expected auto, cpu, cuda or cuda:N, got {device!r}")
    if ops not in OPS:
        raise DeploymentError(f"{where}.ops: expected one of {', '.join(OPS)}, got {ops!r}")
    return Instance(
        kind,
        name,
        host,
        str(hosts[host]),
        micro_batches=_micro_batches(where, entry.get("micro_batches", "auto")),
        dtype=dtype,
        device=device,
        ops=ops,
        config=config,
        nodes=nodes,
        **values,
    )


def _busy_poll(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 100_000:
        raise DeploymentError(f"expert_busy_poll_us: expected 0 to 100000, got {value!r}")
    return value


def _micro_batches(where: str, value: Any) -> int | None:
    if value == "auto":
        return None
    if value == "off":
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DeploymentError(
            f"{where}.micro_batches: expected auto, off or a count >= 1, got {value!r}"
        )
    return value


def _number(where: str, key: str, value: Any) -> int | float | None:
    if key in _OPTIONAL and value == "auto":
        return None
    kind = _OPTIONAL.get(key, int)
    if isinstance(value, bool) or not isinstance(value, int | float) or kind(value) != value:
        raise DeploymentError(f"{where}.{key}: expected {kind.__name__}, got {value!r}")
    return kind(value)


def _pool_nodes(where: str, entry: dict, hosts: dict[str, str]) -> tuple[PoolNode, ...]:
    raw = entry["nodes"]
    if not isinstance(raw, list) or not raw:
        raise DeploymentError(f"{where}: nodes must be a non-empty list of {{host, ranks}}")
    nodes, first = [], 0
    for k, node in enumerate(raw):
        if not isinstance(node, dict) or set(node) != {"host", "ranks"}:
            raise DeploymentError(f"{where}: nodes[{k}] must be {{host, ranks}}")
        host, ranks = str(node["host"]), int(node["ranks"])
        if host not in hosts:
            raise DeploymentError(f"{where}: nodes[{k}] host {host!r} is not in hosts")
        if ranks < 1:
            raise DeploymentError(f"{where}: nodes[{k}] needs at least one rank")
        nodes.append(PoolNode(host, str(hosts[host]), ranks, first))
        first += ranks
    if len({n.host for n in nodes}) != len(nodes):
        raise DeploymentError(f"{where}: a pool has one node per host")
    return tuple(nodes)


def _check(dep: Deployment) -> None:
    names = [i.name for i in dep.instances]
    if len(set(names)) != len(names):
        raise DeploymentError(f"instance names must be unique: {names}")
    targets = [i.target for i in dep.instances]
    if len(set(targets)) != len(targets):
        raise DeploymentError(f"two instances share an address and port: {targets}")
    for kind in REQUIRED:
        if not dep.of_kind(kind):
            raise DeploymentError(f"a deployment needs at least one {kind} instance")
    _check_experts(dep)
    if dep.threads < 0:
        raise DeploymentError("model.threads must be auto or a positive integer")
    if dep.dtype not in DTYPES:
        raise DeploymentError(f"model.dtype must be auto, float32 or bfloat16, not {dep.dtype!r}")
    if dep.kv_dtype not in DTYPES:
        raise DeploymentError(
            f"model.kv_dtype must be auto, float32 or bfloat16, not {dep.kv_dtype!r}"
        )
    for i in dep.instances:
        if not 0 < i.port < 65536 or i.block_size < 1 or i.max_running < 1 or i.threads < 0:
            raise DeploymentError(
                f"{i.name}: port, block_size and max_running must be positive, threads >= 0"
            )
        if (i.kv_blocks is not None and i.kv_blocks < 1) or (
            i.kv_cache_gib is not None and i.kv_cache_gib <= 0
        ):
            raise DeploymentError(f"{i.name}: kv_blocks and kv_cache_gib must be auto or positive")
        if i.kv_blocks is not None and i.kv_cache_gib is not None:
            raise DeploymentError(f"{i.name}: kv_cache_gib sizes an auto pool; kv_blocks is set")


def _check_experts(dep: Deployment) -> None:
    if dep.experts not in EXPERTS_MODES:
        raise DeploymentError(f"experts must be local or remote, not {dep.experts!r}")
    if dep.expert_transport not in EXPERT_TRANSPORTS:
        raise DeploymentError(
            f"expert_transport must be one of {EXPERT_TRANSPORTS}, not {dep.expert_transport!r}"
        )
    pools = dep.of_kind("experts")
    if dep.experts == "remote" and len(pools) != 1:
        raise DeploymentError(
            f"experts: remote needs exactly one expert_pool instance, got {len(pools)}"
        )
    if dep.experts == "local" and pools:
        raise DeploymentError("expert_pool instances are listed but experts is local")
    ports = [i.target for i in dep.instances] + [f"{i.address}:{i.master_port}" for i in pools]
    if len(set(ports)) != len(ports):
        raise DeploymentError(f"an experts master_port collides with another port: {ports}")
    for i in pools:
        if i.ranks < 1 or not 0 < i.master_port < 65536:
            raise DeploymentError(f"{i.name}: ranks and master_port must be positive")
