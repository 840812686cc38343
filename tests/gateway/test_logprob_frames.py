"""Every generated token has exactly one logprob entry in every stream, on both OpenAI APIs.

Regression: with `/v1/completions` streams (`logprobs: 0`), some streams
listed 64-99 entries for 128 tokens. A token whose text the detokenizer holds back (the first
bytes of a multi-byte character) produces an event with logprobs and no text, and the
completions stream dropped such events. The events here come from the real DetokenizeSession
over random byte-level tokens of the embedded vocabulary, cut into random batches, as decode
sends them; they go through the same settle() and framing as a served response."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.events import settle
from gateway.openai_responses import Envelope, chat_chunks, completion_chunks
from k2model import EMBEDDED_CHECKPOINT
from k2model.text.tokenizer import Tokenizer
from services.chat.types import ChatEvent, TokenLogprob, Usage
from services.tokenizer.detokenize_session import DetokenizeOptions, DetokenizeSession

TOKENIZER = Tokenizer.from_dir(EMBEDDED_CHECKPOINT)
# Byte-level ids (many are parts of a UTF-8 character) and some whole-word ones.
ids = st.lists(
    st.integers(0, 255) | st.integers(256, TOKENIZER.n_base - 1), min_size=1, max_size=80
)


def events(token_ids: list[int], cuts: list[int], stop: tuple[str, ...]) -> list[ChatEvent]:
    session = DetokenizeSession(TOKENIZER, DetokenizeOptions(stop=stop))
    bounds = sorted({0, len(token_ids), *(c % (len(token_ids) + 1) for c in cuts)})
    out = []
    for a, b in itertools.pairwise(bounds):
        batch = token_ids[a:b]
        text = session.push(batch).content
        lps = tuple(TokenLogprob(f"t{i}", -0.5, (1,)) for i in batch)
        out.append(ChatEvent(content=text, logprobs=lps))
    usage = Usage(3, len(token_ids))
    out.append(ChatEvent(content=session.finish().content, finish_reason="length", usage=usage))
    return out


async def _frames(chunks: AsyncIterator[bytes]) -> list[dict]:
    frames = []
    async for chunk in chunks:
        payload = chunk.decode().removeprefix("data: ").strip()
        if payload != "[DONE]":
            frames.append(json.loads(payload))
    return frames


async def _source(items: list[ChatEvent]) -> AsyncIterator[ChatEvent]:
    for item in items:
        yield item


def stream(kind: str, items: list[ChatEvent]) -> list[dict]:
    framing = completion_chunks if kind == "text_completion" else chat_chunks
    env = Envelope(kind, "m", "id")
    return asyncio.run(_frames(framing(env, settle(_source(items)), False, True)))


@settings(max_examples=200, deadline=None)
@given(
    token_ids=ids,
    cuts=st.lists(st.integers(0, 100), max_size=20),
    stop=st.sampled_from([(), ("\n",)]),
)
def test_one_logprob_entry_per_token_on_both_apis(token_ids, cuts, stop) -> None:
    items = events(token_ids, cuts, stop)
    completions = stream("text_completion", items)
    entries = [
        t
        for f in completions
        for c in f["choices"]
        if c["logprobs"]
        for t in c["logprobs"]["tokens"]
    ]
    assert len(entries) == len(token_ids)
    chat = stream("chat.completion.chunk", items)
    entries = [
        t for f in chat for c in f["choices"] if c.get("logprobs") for t in c["logprobs"]["content"]
    ]
    assert len(entries) == len(token_ids)
    text = "".join(c["text"] for f in completions for c in f["choices"])
    assert text == "".join(e.content for e in items)
