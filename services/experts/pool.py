"""The rank side of the DeepSpeed job: init, the expert-parallel group, one round's collectives.

Every rank runs `ExpertPool.join` (DeepSpeed init over gloo on CPU / NCCL on GPU, DeepSpeed's
expert-parallel group of all ranks, this rank's expert slice, a barrier once all have loaded).
Rank 0 then leads rounds (`lead`, `heartbeat`, `stop`) and the others `follow`. One round:

1. broadcast a header [1 + R, 2] int64 from rank 0: row 0 = (op, 0), row 1 + r = rank r's
   (rows, pairs), so every rank knows what it will receive;
2. all_to_all_single of packed parts (only rank 0 sends; its own part never leaves it);
3. every rank runs its experts on its part;
4. all_to_all_single of the partial sums back to rank 0 (only rank 0 receives), which adds them.

An all-zero header is a heartbeat: it keeps idle followers inside the collective timeout and
finds a dead peer before a call does. Any failure inside a round leaves the ranks out of step,
so it is final (`PoolBroken`); the supervisor restarts the whole job.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from deepspeed.utils import groups
from torch.distributed.distributed_c10d import _set_pg_timeout

from k2model.runtime import resolve_device
from services.experts import wire
from services.experts.dataplane import DataPlane, Endpoint
from services.experts.plan import Part, combine, pack, packed_bytes, split, unpack
from services.experts.rendezvous import GENERATION_ENV, job_store
from services.experts.routed import Routed
from services.experts.shard import ExpertShard

log = logging.getLogger(__name__)

OP_ROUND, OP_STOP = 0, 1
_TOKEN_KEY, _ENDPOINT_KEY = "dataplane/token", "dataplane/endpoint/"


class PoolBroken(RuntimeError):
    """A collective failed (a peer died, hung past the timeout, or the job is going down)."""


def device_for(local_rank: int, requested: str = "auto") -> torch.device:
    """This rank's device: for auto and cuda, its GPU (local ranks spread over the visible
    GPUs; auto: else the CPU); cuda:N as given; cpu. DeviceUnavailable when a GPU is asked for
    and none is visible."""
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if requested in ("auto", "cuda"):
        count = torch.cuda.device_count()
        requested = f"cuda:{local_rank % count}" if count else "cuda"
    device = resolve_device(requested)
    torch.cuda.set_device(device)
    return device


class ExpertPool:
    def __init__(
        self,
        shard: ExpertShard,
        group: dist.ProcessGroup,
        device: torch.device,
        dataplane: DataPlane,
        endpoints: list[Endpoint],
    ) -> None:
        self.shard, self.group, self.device = shard, group, device
        self.spec = shard.spec
        self.rank = dist.get_rank(group)
        self.dataplane = dataplane  # this rank's: callers' rows straight to its experts
        self.endpoints = endpoints  # every rank's (rank 0; empty elsewhere)

    @classmethod
    def join(
        cls,
        checkpoint: Path,
        dtype: torch.dtype | None,
        fp8_resident: bool,
        device: torch.device,
        load_timeout_s: float,
        collective_timeout_s: float,
        ops: str = "auto",
        dataplane_host: str = "127.0.0.1",
        busy_poll_s: float = 0.0,
    ) -> ExpertPool:
        """Rendezvous (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT and the generation from the
        environment, in the supervisor's store: rendezvous.py; DeepSpeed adopts the process
        group), load this rank's slice, wait for every rank to have loaded. The long load
        timeout covers rendezvous and the barrier; rounds then run under the short collective
        timeout."""
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout, env = timedelta(seconds=load_timeout_s), os.environ
        store = job_store(
            env["MASTER_ADDR"], int(env["MASTER_PORT"]), env[GENERATION_ENV], load_timeout_s
        )
        dist.init_process_group(
            backend,
            store=store,
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            timeout=timeout,
        )
        _no_shm_comm_op()
        deepspeed.init_distributed(
            dist_backend=backend, auto_mpi_discovery=False, timeout=timeout, verbose=False
        )
        rank, ranks = dist.get_rank(), dist.get_world_size()
        groups._create_expert_and_data_parallel(ranks)
        group = groups._get_expert_parallel_group(f"ep_size_{ranks}")
        shard = ExpertShard.load(checkpoint, rank, ranks, dtype, fp8_resident, device, ops)
        log.info(
            "rank %d/%d: experts [%d, %d) loaded (%s)", rank, ranks, *_span(shard), shard.describe
        )
        dataplane, endpoints = _start_dataplane(
            store, shard, rank, ranks, dataplane_host, busy_poll_s
        )
        dist.barrier(group=group)
        _set_pg_timeout(timedelta(seconds=collective_timeout_s), group)
        return cls(shard, group, device, dataplane, endpoints)

    # -- rank 0 --------------------------------------------------------------------------------

    def lead(self, calls: list[Routed]) -> list[torch.Tensor]:
        """One round over every call; outputs per call on the CPU, in each call's dtype."""
        try:
            parts = [p.to(self.device) for p in split(calls, self.spec, self.shard.dtype)]
            self._header(OP_ROUND, [p.header for p in parts])
            self._dispatch(parts)
            partials = [self.shard.compute(parts[0]), *self._gather(parts)]
            return [out.cpu() for out in combine(calls, parts, partials)]
        except Exception as exc:
            raise PoolBroken(f"round failed: {exc}") from exc

    def heartbeat(self) -> None:
        try:
            self._header(OP_ROUND, [(0, 0)] * self.spec.ranks)
        except Exception as exc:
            raise PoolBroken(f"heartbeat failed: {exc}") from exc

    def stop(self) -> None:
        """Tell the followers to leave their loop (best effort: they may be gone already)."""
        try:
            self._header(OP_STOP, [(0, 0)] * self.spec.ranks)
        except Exception as exc:
            log.warning("could not stop the followers: %s", exc)

    def _header(self, op: int, sizes: list[tuple[int, int]]) -> None:
        header = torch.tensor([(op, 0), *sizes], dtype=torch.int64, device=self.device)
        dist.broadcast(header, group=self.group, group_src=0)

    def _dispatch(self, parts: list[Part]) -> None:
        if not any(p.header[0] for p in parts[1:]):
            return
        bufs = [torch.empty(0, dtype=torch.uint8, device=self.device)] + [
            pack(p) for p in parts[1:]
        ]
        sent = torch.cat(bufs)
        received = torch.empty(0, dtype=torch.uint8, device=self.device)
        dist.all_to_all_single(
            received, sent, [0] * len(parts), [b.numel() for b in bufs], group=self.group
        )

    def _gather(self, parts: list[Part]) -> list[torch.Tensor]:
        rows = [p.header[0] for p in parts]
        d = self.spec.hidden_size
        if not any(rows[1:]):
            return [torch.empty(0, d, dtype=self.shard.dtype, device=self.device) for _ in rows[1:]]
        out = torch.empty(sum(rows[1:]), d, dtype=self.shard.dtype, device=self.device)
        nothing = torch.empty(0, d, dtype=self.shard.dtype, device=self.device)
        dist.all_to_all_single(out, nothing, [0, *rows[1:]], [0] * len(rows), group=self.group)
        return list(out.split(rows[1:]))

    # -- ranks 1 .. R-1 ------------------------------------------------------------------------

    def follow(self) -> None:
        """Serve rounds until rank 0 says stop; PoolBroken when a collective fails."""
        ranks, d, dtype = self.spec.ranks, self.spec.hidden_size, self.shard.dtype
        header = torch.empty(1 + ranks, 2, dtype=torch.int64, device=self.device)
        try:
            while True:
                dist.broadcast(header, group=self.group, group_src=0)
                sizes = header.tolist()
                if sizes[0][0] == OP_STOP:
                    return
                if not any(n for n, _ in sizes[2:]):
                    continue  # a heartbeat, or a round that only needs rank 0
                rows, pairs = sizes[1 + self.rank]
                part = self._receive(rows, pairs, ranks, d, dtype)
                partial = self.shard.compute(part)
                out = torch.empty(0, d, dtype=dtype, device=self.device)
                sent = [0] * ranks
                sent[0] = rows
                dist.all_to_all_single(out, partial, [0] * ranks, sent, group=self.group)
        except Exception as exc:
            raise PoolBroken(f"rank {self.rank}: {exc}") from exc

    def _receive(self, rows: int, pairs: int, ranks: int, d: int, dtype: torch.dtype) -> Part:
        nbytes = packed_bytes(rows, pairs, d, dtype)
        buf = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        nothing = torch.empty(0, dtype=torch.uint8, device=self.device)
        got = [0] * ranks
        got[0] = nbytes
        dist.all_to_all_single(buf, nothing, got, [0] * ranks, group=self.group)
        return unpack(buf, rows, pairs, d, dtype)


def _start_dataplane(
    store: dist.Store, shard: ExpertShard, rank: int, ranks: int, host: str, busy_poll_s: float
) -> tuple[DataPlane, list[Endpoint]]:
    """This rank's data plane under the job's token (rank 0 draws it; the store is the job's
    generation's, so a restarted job has a new one), its endpoint published in the store;
    rank 0 reads every rank's."""
    if rank == 0:
        store.set(_TOKEN_KEY, secrets.token_bytes(wire.TOKEN_BYTES).hex())
    token = bytes.fromhex(store.get(_TOKEN_KEY).decode())
    dataplane = DataPlane(shard, token, host, busy_poll_s).start()
    store.set(f"{_ENDPOINT_KEY}{rank}", json.dumps(asdict(dataplane.endpoint)))
    endpoints = []
    if rank == 0:
        endpoints = [
            Endpoint(**json.loads(store.get(f"{_ENDPOINT_KEY}{r}").decode())) for r in range(ranks)
        ]
    return dataplane, endpoints


def _no_shm_comm_op() -> None:
    """DeepSpeed's CPU backend JIT-compiles its shared-memory all-reduce op in init_distributed
    (about a minute, under a file lock that a killed build leaves behind, stalling every later
    start). The pool never all-reduces (rows move with all_to_all), so the op is marked
    incompatible, which makes DeepSpeed skip it; nothing is compiled on the serving path."""
    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        deepspeed.ops.__compatible_ops__[builder.NAME] = False


def _span(shard: ExpertShard) -> tuple[int, int]:
    first = shard.spec.first(shard.rank)
    return first, first + shard.spec.per_rank
