"""Reasoning in a K2-Thinking output: `<think>...</think>` split off as reasoning_content.

K2-Thinking's prompt ends at `<|im_assistant|>assistant<|im_middle|>`; the model writes
`<think>` itself, then its reasoning, then `</think>` and the answer (K2_SPEC 5.1-4, 6.2).
Rules, as vLLM's `kimi_k2` reasoning parser (the streaming twin is stream_parser.py):
- the output starts in reasoning, with or without the opening <think>;
- reasoning ends at the first </think> (consumed) or, if a tool-call section or call begins
  first, right there (the marker stays with the rest: implicit end of reasoning);
- an output that never ends its reasoning is all reasoning;
- other markers inside reasoning (<think>, stray section end / argument / call end) are
  dropped, so no raw marker reaches reasoning_content.
"""

import re

from k2model.text import chat_tokens as tok

THINK_MARKERS = frozenset({tok.THINK_BEGIN, tok.THINK_END})
# What ends reasoning, besides </think>: the start of tool calling.
REASONING_ENDS = (tok.THINK_END, tok.SECTION_BEGIN, tok.SECTION_BEGIN_SINGULAR, tok.CALL_BEGIN)
_DROPPED = (
    tok.THINK_BEGIN,
    tok.SECTION_END,
    tok.SECTION_END_SINGULAR,
    tok.ARG_BEGIN,
    tok.CALL_END,
)
# One pass, leftmost match: no K2 marker can overlap another (each holds "<" only at its start).
_DROPPED_RE = re.compile("|".join(re.escape(m) for m in _DROPPED))


def split_reasoning(text: str) -> tuple[str, str]:
    """(reasoning, rest): rest is what follows </think>, or starts at the tool-call marker."""
    found = [(pos, m) for m in REASONING_ENDS if (pos := text.find(m)) >= 0]
    if not found:
        return _DROPPED_RE.sub("", text), ""
    pos, marker = min(found)
    rest = text[pos + len(marker) :] if marker == tok.THINK_END else text[pos:]
    return _DROPPED_RE.sub("", text[:pos]), rest
