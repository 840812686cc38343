"""Loading the model in a service process: compute threads shared fairly, then the checkpoint
(and its vocabulary, for constrained generation)."""

from __future__ import annotations

import asyncio
import logging
import os

import torch

from k2model import K2Model, load_model
from k2model.constraints import ConstraintCompiler, Vocabulary
from k2model.kernels.ops import OpsUnavailable
from k2model.runtime import DeviceUnavailable, Runtime
from services.common import kv_sizing
from services.common.server import StartupError
from services.deployment import Deployment, Instance
from services.experts.client import ExpertsClient, attach_remote_experts

log = logging.getLogger(__name__)


def cpu_threads(dep: Deployment, me: Instance) -> int:
    """The instance's own `threads`, else model.threads, else by need (at least one each):
    - a prefill instance: the host's cores split among the host's prefill instances. Prefill is
      bursty and on the critical path of every request (decode waits for its KV), so it takes
      the cores decode leaves idle while it waits; measured with bench/serving.py on 2 cores:
      TTFT p50 at concurrency 1 256 -> 182 ms, output tok/s at 64 273 -> 292, the same at 16;
    - decode instances and expert-pool ranks: the cores split evenly among the host's compute
      processes (prefill, decode, every rank). Several processes each spinning up every core's
      worth of OpenMP threads on a small CPU slow every one of them down many times over (an
      expert round ran 100x slower on 2 cores).
    """
    if me.threads:
        return me.threads
    if dep.threads:
        return dep.threads
    if me.kind == "prefill":
        prefills = sum(i.host == me.host for i in dep.of_kind("prefill"))
        return max(1, (os.cpu_count() or 1) // prefills)
    processes = sum(
        sum(n.ranks for n in i.pool_nodes() if n.host == me.host)
        if i.kind == "experts"
        else int(i.host == me.host)
        for i in dep.instances
        if i.kind in _COMPUTE
    )
    return max(1, (os.cpu_count() or 1) // max(1, processes))


_COMPUTE = ("prefill", "decode", "experts")
DECODE_NICE = 10  # a decode instance's nice increment beside a prefill on its host


def step_priority(dep: Deployment, me: Instance) -> int:
    """The nice increment of a model process's step threads: DECODE_NICE for a decode instance
    that shares its host with a prefill instance, else 0. When both have work, the kernel gives
    the cores to prefill first (CFS weights: about 9:1), so waiting prompts reach decode sooner
    and decode steps bigger batches; decode still computes whenever prefill is idle, and its
    event loop (KV in, first tokens out) keeps normal priority. bench/serving.py, 2 cores,
    prefill in bf16, at concurrency 64: nice 0 -> 10 for the whole process, two paired runs,
    304 -> 355 and 327 -> 334 output tok/s, TTFT p50 5.9 -> 5.1 s and 4.8 -> 4.2 s; then the
    model thread alone against the whole process, two paired runs, 305 / 315 against 296 / 282
    tok/s, TTFT p50 5.7 / 5.3 s against 6.1 / 7.5 s. Concurrency 1: the same within noise.
    """
    if me.kind == "decode" and any(p.host == me.host for p in dep.of_kind("prefill")):
        return DECODE_NICE
    return 0


async def load_for(dep: Deployment, me: Instance) -> tuple[K2Model, ExpertsClient | None]:
    """The model for a prefill/decode instance, its MoE layers routed to the expert pool when
    the deployment says `experts: remote` (close the returned client at shutdown)."""
    threads = cpu_threads(dep, me)
    torch.set_num_threads(threads)
    # The device and ops backend are checked, and the CPU extension built (or found built),
    # before anything is read: never inside the first request's model step.
    try:
        rt = await asyncio.to_thread(Runtime.resolve, dep.torch_dtype(me), me.device, me.ops)
    except (DeviceUnavailable, OpsUnavailable) as e:
        raise StartupError(f"{me.name}: {e}") from None
    model = await asyncio.to_thread(
        load_model,
        dep.checkpoint,
        rt.dtype,
        dep.fp8_resident,
        routed_experts=dep.remote_experts is None,
        device=rt.device,
        ops=rt.ops.name,
    )
    log.info("%s: model loaded (%s, %d CPU threads)", me.name, model.rt.describe(), threads)
    remote = dep.remote_experts
    if remote is None:
        return model, None
    return model, attach_remote_experts(
        model,
        remote.target,
        security=dep.security,
        transport=dep.expert_transport,
        busy_poll_s=dep.expert_busy_poll_us / 1e6,
    )


def kv_pool(dep: Deployment, me: Instance, model: K2Model) -> int:
    """The instance's KV blocks (`kv_blocks`, or sized from memory for auto), logged."""
    kv_dtype = dep.torch_kv_dtype()
    blocks = kv_sizing.kv_blocks(dep, me, model.cfg, kv_dtype)
    size = blocks * me.block_size * kv_sizing.bytes_per_token(model.cfg, kv_dtype)
    how = "auto" if me.kv_blocks is None else "set"
    log.info(
        "%s: KV pool %d blocks of %d (%s, %.0f MiB, %s)",
        me.name,
        blocks,
        me.block_size,
        how,
        size / 2**20,
        str(kv_dtype).removeprefix("torch."),
    )
    return blocks


def constraint_compiler(dep: Deployment, model: K2Model) -> ConstraintCompiler:
    """Compiles request constraints against the checkpoint's own tokenizer pieces."""
    return ConstraintCompiler(Vocabulary.from_dir(dep.checkpoint, model.cfg.vocab_size))
