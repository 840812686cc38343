"""A multi-prompt completion's starts (gateway/merged.py): one failing, or the client leaving
while they start, closes every generation already admitted, so none keeps its slot."""

from __future__ import annotations

import asyncio

import pytest

from gateway.merged import start_all


class Admitted:
    def __init__(self) -> None:
        self.closed = False

    async def close(self) -> None:
        self.closed = True


async def admitted(generation: Admitted) -> Admitted:
    return generation


async def refused() -> Admitted:
    await asyncio.sleep(0)
    raise RuntimeError("queue full")


async def never() -> Admitted:
    await asyncio.Event().wait()
    raise AssertionError


def test_a_failed_start_closes_the_admitted_ones() -> None:
    first, second = Admitted(), Admitted()
    with pytest.raises(RuntimeError, match="queue full"):
        asyncio.run(start_all([admitted(first), refused(), admitted(second)], 1))
    assert first.closed and second.closed


def test_leaving_while_starting_closes_the_admitted_ones() -> None:
    first = Admitted()

    async def run() -> None:
        task = asyncio.ensure_future(start_all([admitted(first), never()], 1))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run())
    assert first.closed


def test_one_prompt_is_its_own_generation() -> None:
    only = Admitted()
    assert asyncio.run(start_all([admitted(only)], 1)) is only and not only.closed
