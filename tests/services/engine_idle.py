"""Waiting for a prefill or decode engine to hold nothing (both report the same stats)."""

from __future__ import annotations

import asyncio
from typing import Protocol


class Engine(Protocol):
    def stats(self) -> dict[str, int]: ...


async def until_idle(engine: Engine) -> dict[str, int]:
    """The engine's stats once every KV block is free and nothing runs or waits."""
    while True:
        stats = engine.stats()
        free = stats["kv_blocks_free"] == stats["kv_blocks_total"]
        if free and stats["running"] == stats["queued"] == 0:
            return stats
        await asyncio.sleep(0.01)
