"""Stored responses (`store`, the Responses API default): what `previous_response_id`,
`GET /v1/responses/{id}` and `DELETE /v1/responses/{id}` read.

In the gateway's memory, bounded (the oldest is dropped past `max_items`) and expiring
(`ttl_s`); a response belongs to the API key that made it, and another key sees it as missing
(404), never as forbidden, so ids cannot be probed. A gateway restart forgets them: a client
then gets a clear 404 naming previous_response_id and can resend the conversation.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from k2model.text.messages import Message


@dataclass(frozen=True)
class StoredResponse:
    owner: str  # the API key's name
    body: dict[str, Any]  # the response object
    conversation: tuple[Message, ...]  # the prompt's turns and this output (no instructions)
    stored_at: float


class ResponseStore:
    def __init__(self, max_items: int = 1024, ttl_s: float = 3600.0) -> None:
        self.max_items, self.ttl_s = max_items, ttl_s
        self._items: OrderedDict[str, StoredResponse] = OrderedDict()

    def put(self, owner: str, body: dict[str, Any], conversation: tuple[Message, ...]) -> None:
        self._expire()
        self._items[body["id"]] = StoredResponse(owner, body, conversation, time.monotonic())
        while len(self._items) > self.max_items:
            self._items.popitem(last=False)

    def get(self, owner: str, response_id: str) -> StoredResponse | None:
        self._expire()
        item = self._items.get(response_id)
        return item if item is not None and item.owner == owner else None

    def delete(self, owner: str, response_id: str) -> bool:
        if self.get(owner, response_id) is None:
            return False
        del self._items[response_id]
        return True

    def __len__(self) -> int:
        return len(self._items)

    def _expire(self) -> None:
        cutoff = time.monotonic() - self.ttl_s
        while self._items and next(iter(self._items.values())).stored_at < cutoff:
            self._items.popitem(last=False)
