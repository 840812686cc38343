"""`python -m services.prefill --deployment FILE --name NAME`: one prefill instance."""

from __future__ import annotations

import asyncio

from services.common.main_args import parse
from services.common.model_host import constraint_compiler, load_for
from services.common.server import ServerOptions, run, run_until_signal, start_server
from services.experts.client import attach_remote_experts
from services.pb.k2.v1 import prefill_pb2, prefill_pb2_grpc
from services.prefill.engine import PrefillEngine, PrefillLimits
from services.prefill.servicer import PrefillServicer

SERVICE = prefill_pb2.DESCRIPTOR.services_by_name["Prefill"].full_name


async def main() -> None:
    dep, me = parse("prefill", __doc__)
    model = await load_for(dep, me)
    remote = dep.remote_experts
    experts = attach_remote_experts(model, remote.target) if remote else None
    limits = PrefillLimits(
        me.kv_blocks, me.block_size, me.chunk_tokens, me.max_batch_tokens, me.max_queue
    )
    engine = PrefillEngine(model, limits, constraint_compiler(dep, model))
    servicer = PrefillServicer(engine)
    running = await start_server(
        me.name,
        [lambda s: prefill_pb2_grpc.add_PrefillServicer_to_server(servicer, s)],
        [SERVICE],
        ServerOptions(bind=me.target),
    )
    engine_task = asyncio.create_task(engine.run())
    running.set_serving()
    print(f"{me.name} listening on {running.address}", flush=True)
    await run_until_signal(running, grace_s=10.0)
    engine_task.cancel()
    if experts is not None:
        experts.close()


if __name__ == "__main__":
    run(main)
