"""`python -m services.decode --deployment FILE --name NAME`: one decode instance."""

from __future__ import annotations

import logging

from k2model.runner import MICRO_BATCH_MIN
from services.common.main_args import parse
from services.common.model_host import constraint_compiler, kv_pool, load_for, step_priority
from services.common.serve_instance import serve_instance
from services.common.server import run
from services.decode.engine import DecodeEngine, DecodeLimits
from services.decode.prefill_client import PrefillPool
from services.decode.servicer import DecodeServicer
from services.pb.k2.v1 import decode_pb2, decode_pb2_grpc

log = logging.getLogger("services.decode")
SERVICE = decode_pb2.DESCRIPTOR.services_by_name["Decode"].full_name


async def main() -> None:
    dep, me = parse("decode", __doc__)
    model, experts = await load_for(dep, me)
    prefills = [p.target for p in dep.of_kind("prefill")]
    kv_dtype = dep.torch_kv_dtype()
    pool = PrefillPool(prefills, model.cfg, kv_dtype, security=dep.security)
    limits = DecodeLimits(kv_pool(dep, me, model), me.block_size, me.max_running, me.max_queue)
    compiler = constraint_compiler(dep, model)
    nice = step_priority(dep, me)
    log.info("%s: model steps at nice +%d", me.name, nice)
    split = dep.micro_batch_min(me)
    split = MICRO_BATCH_MIN if split is None else split
    if experts is not None:
        log.info("%s: micro-batches of %s", me.name, f">= {split} sequences" if split else "off")
    engine = DecodeEngine(model, limits, pool.prefill, compiler, kv_dtype, nice, split)
    servicer = DecodeServicer(engine)
    pool.start()
    try:
        await serve_instance(
            me,
            lambda s: decode_pb2_grpc.add_DecodeServicer_to_server(servicer, s),
            SERVICE,
            (engine.run(),),
            security=dep.security,
        )
    finally:
        await pool.close()
        if experts is not None:
            experts.close()


if __name__ == "__main__":
    run(main)
