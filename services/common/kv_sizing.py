"""KV pool sizes for `kv_blocks: auto`: from the memory a process may use, capped by what it can use.

Budget: the instance's `kv_cache_gib`, else AUTO_MEMORY_SHARE of the host's available memory
(MemAvailable, read when the process starts) split evenly among the prefill and decode instances
on that host. Cap: what the instance can ever hold - a decode instance `max_running` sequences of
the whole context, a prefill instance the prompts it works on at once (a context's worth or four
steps' token budget, whichever is more; more only queues prompts that wait for the model anyway).
The result is logged by the caller; `kv_blocks: N` sets it outright.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from k2model.config import K2Config
from services.deployment import Deployment, Instance

AUTO_MEMORY_SHARE = 0.4
GIB = 1 << 30


def bytes_per_token(cfg: K2Config, kv_dtype: torch.dtype) -> int:
    """Every layer's latent ([c_kv | k_pe], kv_cache_dim values) of one token."""
    return cfg.num_hidden_layers * cfg.kv_cache_dim * kv_dtype.itemsize


def available_memory() -> int:
    """The host's MemAvailable in bytes (all of its memory where /proc/meminfo is missing)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def kv_blocks(
    dep: Deployment,
    me: Instance,
    cfg: K2Config,
    kv_dtype: torch.dtype,
    available: int | None = None,
) -> int:
    if me.kv_blocks is not None:
        return me.kv_blocks
    if me.kv_cache_gib is not None:
        budget = me.kv_cache_gib * GIB
    else:
        holders = sum(i.host == me.host for k in ("prefill", "decode") for i in dep.of_kind(k))
        free = available_memory() if available is None else available
        budget = free * AUTO_MEMORY_SHARE / max(1, holders)
    per_block = bytes_per_token(cfg, kv_dtype) * me.block_size
    context = cfg.max_position_embeddings
    useful = (
        me.max_running * context if me.kind == "decode" else max(context, 4 * me.max_batch_tokens)
    )
    return max(1, min(int(budget // per_block), math.ceil(useful / me.block_size)))
