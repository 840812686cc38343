"""Reasoning in a K2-Thinking output: `<think>...</think>` split off as reasoning_content.

K2-Thinking's prompt ends at `<|im_assistant|>assistant<|im_middle|>`; the model writes
`<think>` itself, then its reasoning, then `</think>` and the answer (docs/text.md, reasoning).
Rules, as vLLM's `kimi_k2` reasoning parser (the streaming twin is stream_parser.py), over the
output's pieces (pieces.py: markers are control ids, never text that spells them):
- the output starts in reasoning, with or without the opening <think>;
- reasoning ends at the first </think> (consumed) or, if a tool-call section or call begins
  first, right there (the marker stays with the rest: implicit end of reasoning);
- an output that never ends its reasoning is all reasoning;
- other markers inside reasoning (<think>, stray section end / argument / call end) are
  dropped, so no marker reaches reasoning_content; text that merely spells one is reasoning.
"""

from collections.abc import Sequence

from k2model.text import chat_tokens as tok
from k2model.text.pieces import Piece

THINK_MARKERS = frozenset({tok.THINK_BEGIN, tok.THINK_END})
# What ends reasoning, besides </think>: the start of tool calling (the marker stays).
CALLING_BEGINS = frozenset({tok.SECTION_BEGIN, tok.CALL_BEGIN})


def strip_singular_begin(text: str) -> str:
    """Text before a call or section begin, less a trailing singular section begin the model
    spelled as text (docs/text.md, tool calls; only white space between it and the control token)."""
    kept = text.rstrip()
    if kept.endswith(tok.SECTION_BEGIN_SINGULAR):
        return kept[: -len(tok.SECTION_BEGIN_SINGULAR)]
    return text


def split_reasoning(pieces: Sequence[Piece]) -> tuple[str, list[Piece]]:
    """(reasoning, rest): rest is what follows </think>, or starts at the tool-call marker.
    `pieces` must have adjacent text merged (pieces.merge)."""
    thought: list[str] = []
    for i, piece in enumerate(pieces):
        if isinstance(piece, str):
            thought.append(piece)
        elif piece.name == tok.THINK_END:
            return "".join(thought), list(pieces[i + 1 :])
        elif piece.name in CALLING_BEGINS:
            if i and isinstance(pieces[i - 1], str):
                thought[-1] = strip_singular_begin(thought[-1])
            return "".join(thought), list(pieces[i:])
    return "".join(thought), []
