"""Several admitted generations as one response: a legacy completion with a list of prompts.

Prompt p's choice c becomes choice p * n + c (OpenAI's order); an event's usage becomes the sum
of every generation's latest, and one event with the total ends the stream. The
generations run concurrently; closing the merge closes every one of them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Coroutine
from dataclasses import replace
from typing import Any, cast

from gateway.serving import Generation
from services.chat.types import ChatEvent, Usage

_DONE = object()


class MergedGeneration:
    def __init__(self, generations: list[Generation], n: int) -> None:
        self._generations, self._n = generations, n

    async def __aiter__(self) -> AsyncIterator[ChatEvent]:
        queue: asyncio.Queue[tuple[int, ChatEvent] | BaseException | object] = asyncio.Queue()

        async def pump(p: int, generation: Generation) -> None:
            try:
                async for event in generation:
                    queue.put_nowait((p, replace(event, choice=p * self._n + event.choice)))
                queue.put_nowait(_DONE)
            except BaseException as e:
                queue.put_nowait(e)

        tasks = [asyncio.create_task(pump(p, g)) for p, g in enumerate(self._generations)]
        latest: dict[int, Usage] = {}  # per prompt
        done = 0
        try:
            while done < len(tasks):
                item = await queue.get()
                if item is _DONE:
                    done += 1
                    continue
                if isinstance(item, BaseException):
                    raise item
                p, event = cast(tuple[int, ChatEvent], item)
                if event.usage is not None:
                    latest[p] = event.usage
                    event = replace(event, usage=_total(latest))
                yield event
            yield ChatEvent(usage=_total(latest))
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def close(self) -> None:
        await asyncio.gather(*(g.close() for g in self._generations))


async def start_all(
    starts: list[Coroutine[Any, Any, Generation]], n: int
) -> Generation | MergedGeneration:
    """Awaits every start (coroutines of Gateway.start). One failing, or the wait being
    cancelled (the client left), closes every generation already admitted: none keeps its
    slot."""
    tasks = [asyncio.ensure_future(s) for s in starts]
    try:
        generations = list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks)
        admitted = [t.result() for t in tasks if not t.cancelled() and t.exception() is None]
        await asyncio.gather(*(g.close() for g in admitted))
        raise
    return generations[0] if len(generations) == 1 else MergedGeneration(generations, n)


def _total(latest: dict[int, Usage]) -> Usage:
    return Usage(
        sum(u.prompt_tokens for u in latest.values()),
        sum(u.completion_tokens for u in latest.values()),
    )
