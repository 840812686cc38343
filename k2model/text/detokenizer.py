"""Incremental detokenizer: generated ids in, newly completed text out, for streaming.

A token is a byte string and need not end on a UTF-8 character boundary (an emoji often spans
two or three byte-level tokens). The incomplete tail of a multi-byte sequence is held until a
later token completes it, so no delta ever carries a broken character. Invariant:
"".join(push(...) for each batch) + flush() == tokenizer.decode(all ids, skip_special_tokens),
which holds because Python's incremental UTF-8 decoder with errors="replace" yields exactly the
one-shot decode. Work per push is proportional to the bytes of the new ids only.
"""

import codecs
from collections.abc import Sequence

from k2model.text.tokenizer import Tokenizer


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, ids: Sequence[int]) -> str:
        """Text completed by these ids; a trailing partial character waits for the next push."""
        if self._skip_special:
            ids = [i for i in ids if not self._tokenizer.is_special(i)]
        return self._utf8.decode(self._tokenizer.decode_bytes(ids))

    def flush(self) -> str:
        """End of stream: a still-incomplete tail becomes U+FFFD, as in a one-shot decode."""
        return self._utf8.decode(b"", final=True)
