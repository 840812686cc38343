"""Stop-string matching over a stream of text deltas.

Text that could still turn into a stop string is held back until the following text settles
it, so a stop string split across any number of deltas is still caught and never partly
emitted. On a match the text before the stop string is emitted and the stream is over; the
stop string and anything after it are dropped.

"First match" means the first to complete in the stream (generation stops as soon as one
completes); among stop strings completing at the same character, the one starting earliest
wins. That choice does not depend on how the text was split into deltas.

Stop TOKENS are not handled here: the caller checks each generated id against
`Tokenizer.stop_ids` (<|im_end|>, [EOS]) before detokenizing, and ends the stream on a hit.
"""

from collections.abc import Sequence

MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 256


class StopMatcher:
    def __init__(self, stop_strings: Sequence[str]):
        if isinstance(stop_strings, str):
            raise TypeError("stop_strings must be a sequence of strings, not one string")
        if len(stop_strings) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stop_strings)}")
        for s in stop_strings:
            if not s or len(s) > MAX_STOP_CHARS:
                raise ValueError(f"stop strings must be 1..{MAX_STOP_CHARS} chars, got {s!r}")
        self._stops = tuple(dict.fromkeys(stop_strings))
        self._held = ""  # a suffix of the stream that is a proper prefix of some stop string
        self._stopped = False

    def push(self, text_delta: str) -> tuple[str, bool]:
        """Returns (text safe to emit now, stopped). After a stop, further pushes emit nothing."""
        if self._stopped:
            return "", True
        buf = self._held + text_delta
        start = self._first_match(buf, len(self._held))
        if start is not None:
            self._held, self._stopped = "", True
            return buf[:start], True
        keep = min((_partial_start(buf, s) for s in self._stops), default=len(buf))
        self._held = buf[keep:]
        return buf[:keep], False

    def flush(self) -> str:
        """End of stream without a stop: releases the held text."""
        held, self._held = self._held, ""
        return held

    def _first_match(self, buf: str, n_held: int) -> int | None:
        # The held text contains no whole stop string, so a match must end in the new delta.
        best: tuple[int, int] | None = None  # (end, start)
        for s in self._stops:
            start = buf.find(s, max(0, n_held - len(s) + 1))
            if start != -1 and (best is None or (start + len(s), start) < best):
                best = (start + len(s), start)
        return None if best is None else best[1]


def _partial_start(buf: str, stop: str) -> int:
    """Start of the longest suffix of buf that is a proper prefix of stop, else len(buf)."""
    i = buf.find(stop[0], max(0, len(buf) - len(stop) + 1))
    while i != -1:
        if stop.startswith(buf[i:]):
            return i
        i = buf.find(stop[0], i + 1)
    return len(buf)
