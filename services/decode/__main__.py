"""`python -m services.decode --deployment FILE --name NAME`: one decode instance."""

from __future__ import annotations

import asyncio

from services.common.main_args import parse
from services.common.model_host import constraint_compiler, load_for
from services.common.server import ServerOptions, run, run_until_signal, start_server
from services.decode.engine import DecodeEngine, DecodeLimits
from services.decode.prefill_client import PrefillPool
from services.decode.servicer import DecodeServicer
from services.experts.client import attach_remote_experts
from services.pb.k2.v1 import decode_pb2, decode_pb2_grpc

SERVICE = decode_pb2.DESCRIPTOR.services_by_name["Decode"].full_name


async def main() -> None:
    dep, me = parse("decode", __doc__)
    model = await load_for(dep, me)
    remote = dep.remote_experts
    experts = attach_remote_experts(model, remote.target) if remote else None
    pool = PrefillPool([p.target for p in dep.of_kind("prefill")], model.cfg, model.dtype)
    limits = DecodeLimits(me.kv_blocks, me.block_size, me.max_running, me.max_queue)
    engine = DecodeEngine(model, limits, pool.prefill, constraint_compiler(dep, model))
    servicer = DecodeServicer(engine)
    running = await start_server(
        me.name,
        [lambda s: decode_pb2_grpc.add_DecodeServicer_to_server(servicer, s)],
        [SERVICE],
        ServerOptions(bind=me.target),
    )
    pool.start()
    engine_task = asyncio.create_task(engine.run())
    running.set_serving()
    print(f"{me.name} listening on {running.address}", flush=True)
    await run_until_signal(running, grace_s=10.0)
    engine_task.cancel()
    if experts is not None:
        experts.close()
    await pool.close()


if __name__ == "__main__":
    run(main)
