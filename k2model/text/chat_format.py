"""K2's chat format, rendered natively as (text, is_control) segments.

A control segment is exactly one added-token name (e.g. "<|im_end|>"); every other segment is
ordinary text that the tokenizer encodes with no special-token recognition, so a user who types
"<|im_end|>" cannot close a turn. Adjacent text is merged into one segment, because HF encodes
the text between two added tokens as one piece and BPE merges differ at a cut.

Flavors (docs/text.md, chat format):
- "k2-instruct": the current K2-Instruct / 0905 template, i.e. the K2-Thinking logic without
  <think>: header name = `name or role`, default system prompt "You are Kimi, ...", tool calls in
  a tool-call section, tool results as "## Return of {id}\\n{content}".
- "k2-instruct-0711": the July 2025 v1 template (golden examples only): fixed role headers,
  "You are a helpful assistant" (only when there are messages), tool calls and ids not rendered.
- "k2-thinking": history / suffix split at the last assistant message without tool calls;
  history assistant turns get "<think></think>", suffix turns keep their reasoning.
Current flavors declare tools as compact JSON with all keys sorted (what the later
tokenization_kimi.py feeds its template, docs/text.md, chat format); v1 uses json.dumps' default separators
in insertion order.

Partial mode: a trailing assistant message with partial=True is rendered exactly as a normal
turn but left open (no <|im_end|>) and no generation prompt follows, which is what HF's
`continue_final_message` gives with these templates. In k2-thinking that turn is the last
assistant turn without calls, so like any history turn it gets "<think></think>".

Each template in templates/ (and the reference templates of ../shared) renders byte-identical
text; tests/text/test_jinja_template.py keeps them equal.
"""

import json
from collections.abc import Sequence
from typing import Literal, get_args

from k2model.text import chat_tokens as tok
from k2model.text.messages import (
    ChatFormatError,
    Content,
    ImagePart,
    Message,
    Tool,
    validate_messages,
)
from k2model.text.tool_ids import normalize_tool_ids

Flavor = Literal["k2-instruct", "k2-instruct-0711", "k2-thinking"]
FLAVORS: tuple[Flavor, ...] = get_args(Flavor)
Segment = tuple[str, bool]

DEFAULT_SYSTEM = "You are Kimi, an AI assistant created by Moonshot AI."
DEFAULT_SYSTEM_0711 = "You are a helpful assistant"

_ROLE_TOKEN = {
    "user": tok.IM_USER,
    "assistant": tok.IM_ASSISTANT,
    "system": tok.IM_SYSTEM,
    "tool": tok.IM_SYSTEM,
}


def control_tokens(flavor: Flavor) -> frozenset[str]:
    """The names this flavor's tokenizer splits out of rendered text as single tokens."""
    return tok.THINKING_CONTROLS if flavor == "k2-thinking" else tok.INSTRUCT_CONTROLS


class _Segments:
    def __init__(self, controls: frozenset[str]):
        self.items: list[Segment] = []
        self._controls = controls

    def text(self, text: str) -> None:
        if not text:
            return
        if self.items and not self.items[-1][1]:
            self.items[-1] = (self.items[-1][0] + text, False)
        else:
            self.items.append((text, False))

    def control(self, name: str) -> None:
        self.items.append((name, True))

    def name(self, name: str) -> None:
        """A token name that is a control in this flavor's vocabulary, else plain text."""
        if name in self._controls:
            self.control(name)
        else:
            self.text(name)

    def block(self, role_token: str, header: str, body: str) -> None:
        self.control(role_token)
        self.text(header)
        self.control(tok.IM_MIDDLE)
        self.text(body)
        self.control(tok.IM_END)

    def content(self, content: Content, *, newline_after_image: bool) -> None:
        if content is None or isinstance(content, str):
            self.text(content or "")
            return
        for part in content:
            if isinstance(part, ImagePart):
                self.text(tok.MEDIA_START + "image")
                for name in (tok.MEDIA_CONTENT, tok.MEDIA_PAD, tok.MEDIA_END):
                    self.name(name)
                # The current templates' render_content macro leaves a newline after the
                # placeholder (a trim_blocks artefact); v1 does not.
                self.text("\n" if newline_after_image else "")
            else:
                self.text(part.text)


def render(
    messages: Sequence[Message],
    tools: Sequence[Tool] | None = None,
    *,
    flavor: Flavor,
    add_generation_prompt: bool = True,
    keep_reasoning: bool = False,
) -> list[Segment]:
    """keep_reasoning: every assistant turn keeps its reasoning_content (Moonshot's thinking
    keep "all"); by default only the turns after the last finished answer do, as the template."""
    if flavor not in FLAVORS:
        raise ChatFormatError(f"unknown chat flavor {flavor!r}; expected one of {FLAVORS}")
    validate_messages(messages)
    messages = normalize_tool_ids(messages)
    out = _Segments(control_tokens(flavor))
    if flavor == "k2-instruct-0711":
        _render_v1(out, messages, tools or ())
    else:
        thinking = flavor == "k2-thinking"
        _render_current(out, messages, tools or (), thinking=thinking, keep=keep_reasoning)
    if messages and messages[-1].partial:
        out.items.pop()  # the partial turn's <|im_end|>: the model continues that turn
    elif add_generation_prompt:
        out.control(tok.IM_ASSISTANT)
        out.text("assistant")
        out.control(tok.IM_MIDDLE)
    return out.items


def render_text(
    messages: Sequence[Message],
    tools: Sequence[Tool] | None = None,
    *,
    flavor: Flavor,
    add_generation_prompt: bool = True,
    keep_reasoning: bool = False,
) -> str:
    segments = render(
        messages,
        tools,
        flavor=flavor,
        add_generation_prompt=add_generation_prompt,
        keep_reasoning=keep_reasoning,
    )
    return "".join(text for text, _ in segments)


def _render_v1(out: _Segments, messages: Sequence[Message], tools: Sequence[Tool]) -> None:
    if tools:
        declared = json.dumps([t.to_dict() for t in tools], ensure_ascii=False)
        out.block(tok.IM_SYSTEM, "tool_declare", declared)
    if messages and messages[0].role != "system":
        out.block(tok.IM_SYSTEM, "system", DEFAULT_SYSTEM_0711)
    for m in messages:
        out.control(_ROLE_TOKEN[m.role])
        out.text(m.role)
        out.control(tok.IM_MIDDLE)
        # v1 drops tool calls, tool ids and reasoning. (Its template fails on None content;
        # rendering nothing is the only reading that keeps the turn.)
        out.content(m.content, newline_after_image=False)
        out.control(tok.IM_END)


def _render_current(
    out: _Segments,
    messages: Sequence[Message],
    tools: Sequence[Tool],
    *,
    thinking: bool,
    keep: bool,
) -> None:
    if tools:
        declared = json.dumps(
            [t.to_dict() for t in tools], ensure_ascii=False, separators=(",", ":"), sort_keys=True
        )
        out.block(tok.IM_SYSTEM, "tool_declare", declared)
    if not messages or messages[0].role != "system":
        out.block(tok.IM_SYSTEM, "system", DEFAULT_SYSTEM)
    history_end = -1 if keep else _last_plain_assistant(messages)
    for i, m in enumerate(messages):
        out.control(_ROLE_TOKEN[m.role])
        out.text(m.name or m.role)
        out.control(tok.IM_MIDDLE)
        if m.role == "assistant":
            if thinking:
                # Reasoning is kept only after the last finished answer (the live tool loop).
                out.control(tok.THINK_BEGIN)
                kept = m.reasoning_content if i > history_end else None
                out.text(kept or "")
                out.control(tok.THINK_END)
            out.content(m.content, newline_after_image=True)
            _tool_calls(out, m)
        elif m.role == "tool":
            out.text(f"## Return of {m.tool_call_id}\n")
            out.content(m.content, newline_after_image=True)
        else:
            out.content(m.content, newline_after_image=True)
        out.control(tok.IM_END)


def _last_plain_assistant(messages: Sequence[Message]) -> int:
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].role == "assistant" and not messages[i].tool_calls:
            return i
    return -1


def _tool_calls(out: _Segments, message: Message) -> None:
    if not message.tool_calls:
        return
    out.control(tok.SECTION_BEGIN)
    for call in message.tool_calls:
        out.control(tok.CALL_BEGIN)
        out.text(call.id)
        out.control(tok.ARG_BEGIN)
        out.text(call.arguments)
        out.control(tok.CALL_END)
    out.control(tok.SECTION_END)
