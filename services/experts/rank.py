"""`python -m services.experts.rank --deployment F --name N`: one rank of the expert job.

Started only by the job supervisor (`python -m services.experts`), which sets RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT. Rank 0 binds the instance's gRPC address first (health
NOT_SERVING), joins the job, and reports SERVING once every rank has loaded its experts; it then
leads rounds until SIGTERM (drain, then stop the followers: exit 0) or until the pool breaks
(UNAVAILABLE to every caller, exit 1 so the supervisor restarts the job). The other ranks follow
rounds until told to stop (exit 0) or a collective fails (exit 1).
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import sys

import torch
import uvloop

from k2model.config import K2Config
from k2model.kernels.ops import OpsUnavailable
from k2model.runtime import DeviceUnavailable
from services.common.main_args import parse
from services.common.model_host import cpu_threads
from services.common.server import (
    EXIT_STARTUP,
    ServerOptions,
    StartupError,
    run_until_signal,
    start_server,
)
from services.deployment import Deployment, Instance
from services.experts.batcher import Batcher
from services.experts.pool import ExpertPool, PoolBroken, device_for
from services.experts.routed import COLLECTIVE_TIMEOUT_S, PoolSpec
from services.experts.servicer import ExpertsServicer
from services.pb.k2.v1 import experts_pb2, experts_pb2_grpc

log = logging.getLogger(__name__)

SERVICE = experts_pb2.DESCRIPTOR.services_by_name["Experts"].full_name
LOAD_TIMEOUT_S = 600.0  # rendezvous + loading + the all-loaded barrier
HEARTBEAT_S = 1.0  # idle leader's empty round, well inside the collective timeout
DRAIN_S = 10.0
_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Linux: SIGKILL this rank when the supervisor dies, so a killed job never leaves orphans
    holding the ports."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() == 1:
            os._exit(1)


def join(dep: Deployment, me: Instance, local_rank: int) -> ExpertPool:
    try:
        device = device_for(local_rank, me.device)
        return ExpertPool.join(
            dep.checkpoint,
            dep.torch_dtype(),
            dep.fp8_resident,
            device,
            LOAD_TIMEOUT_S,
            COLLECTIVE_TIMEOUT_S,
            me.ops,
            me.address,
            dep.expert_busy_poll_us / 1e6,
        )
    except (DeviceUnavailable, OpsUnavailable) as e:
        raise StartupError(f"{me.name}: {e}") from None


async def lead(dep: Deployment, me: Instance) -> int:
    spec = PoolSpec.of(K2Config.from_dir(dep.checkpoint), me.ranks)
    batcher = Batcher(HEARTBEAT_S)
    servicer = ExpertsServicer(batcher, spec)
    running = await start_server(
        me.name,
        [lambda s: experts_pb2_grpc.add_ExpertsServicer_to_server(servicer, s)],
        [SERVICE],
        ServerOptions(bind=me.target, security=dep.security),
    )
    pool = await asyncio.to_thread(join, dep, me, 0)
    servicer.endpoints, servicer.token = pool.endpoints, pool.dataplane.token
    servicer.dataplane = pool.dataplane
    rounds = asyncio.create_task(batcher.run(pool.lead, pool.heartbeat))
    running.set_serving()
    print(f"{me.name} listening on {running.address} ({spec.ranks} ranks)", flush=True)

    async def drain_when_broken() -> None:
        await rounds  # returns only once the pool broke
        await running.drain(grace_s=0.5)

    watcher = asyncio.create_task(drain_when_broken())
    await run_until_signal(running, grace_s=DRAIN_S)
    pool.dataplane.stop()
    if batcher.broken is not None:
        return 1
    watcher.cancel()
    rounds.cancel()
    await batcher.close(pool.stop)
    return 0


def follow(dep: Deployment, me: Instance, local_rank: int) -> int:
    pool = join(dep, me, local_rank)
    try:
        pool.follow()
    except PoolBroken as exc:
        log.error("%s", exc)
        return 1
    finally:
        pool.dataplane.stop()
    return 0


def main() -> None:
    try:
        _main()
    except StartupError as e:
        log.critical("cannot start: %s", e)
        sys.exit(EXIT_STARTUP)


def _main() -> None:
    die_with_parent()
    dep, me = parse("experts", __doc__)
    if int(os.environ["WORLD_SIZE"]) != me.ranks:
        sys.exit(f"WORLD_SIZE {os.environ['WORLD_SIZE']} but {me.name} has {me.ranks} ranks")
    torch.set_num_threads(cpu_threads(dep, me))
    if int(os.environ["RANK"]) != 0:
        sys.exit(follow(dep, me, int(os.environ["LOCAL_RANK"])))
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        sys.exit(runner.run(lead(dep, me)))


if __name__ == "__main__":
    main()
