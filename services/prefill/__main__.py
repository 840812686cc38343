"""`python -m services.prefill --deployment FILE --name NAME`: one prefill instance."""

from __future__ import annotations

from services.common.main_args import parse
from services.common.model_host import constraint_compiler, kv_pool, load_for
from services.common.serve_instance import serve_instance
from services.common.server import run
from services.pb.k2.v1 import prefill_pb2, prefill_pb2_grpc
from services.prefill.engine import PrefillEngine, PrefillLimits
from services.prefill.servicer import PrefillServicer

SERVICE = prefill_pb2.DESCRIPTOR.services_by_name["Prefill"].full_name


async def main() -> None:
    dep, me = parse("prefill", __doc__)
    model, experts = await load_for(dep, me)
    blocks = kv_pool(dep, me, model)
    limits = PrefillLimits(
        blocks, me.block_size, me.chunk_tokens, me.max_batch_tokens, me.max_queue
    )
    engine = PrefillEngine(model, limits, constraint_compiler(dep, model), dep.torch_kv_dtype())
    servicer = PrefillServicer(engine)
    try:
        await serve_instance(
            me,
            lambda s: prefill_pb2_grpc.add_PrefillServicer_to_server(servicer, s),
            SERVICE,
            (engine.run(),),
            security=dep.security,
        )
    finally:
        if experts is not None:
            experts.close()


if __name__ == "__main__":
    run(main)
