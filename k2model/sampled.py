"""One sampled token as every layer passes it on: the engines, the services and their codecs.
Pure Python (no torch), so the processes that only relay tokens need no tensor library."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Sampled:
    """One sampled token: its logprob under the raw model distribution (None when the request
    did not ask) and its top (token id, logprob) alternatives, best first."""

    token_id: int
    logprob: float | None = None
    top: tuple[tuple[int, float], ...] = ()
