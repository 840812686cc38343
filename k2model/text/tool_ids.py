"""Canonical tool-call ids for a conversation's history: `functions.{name}:{index}`.

K2 was trained on ids of exactly that form, with `index` counting calls across the whole
conversation (0-based, in order of appearance), and it continues that numbering when it calls
again. Client-made ids (`call_abc123`, `search:0`, per-message restarts) make it emit malformed
ids, which strict parsers then reject (docs/text.md, tool calls); Moonshot's own
API renames history ids the same way before the model sees them.

Where this runs: both renderers, `chat_format.render` and `JinjaChatTemplate.render`, call
`normalize_tool_ids` right after `validate_messages` and before rendering, so every prompt the
model sees has canonical ids, whichever template produced it. Nothing is renamed in the
client's view: ids in responses come from the model's output (tool_parser.py), which already
continues this numbering.
"""

from collections.abc import Sequence
from dataclasses import replace

from k2model.text.messages import ChatFormatError, Message


def canonical_id(name: str, index: int) -> str:
    return f"functions.{name}:{index}"


def count_tool_calls(messages: Sequence[Message]) -> int:
    """How many calls the history holds: the first index the model's next call will use."""
    return sum(len(m.tool_calls) for m in messages)


def normalize_tool_ids(messages: Sequence[Message]) -> tuple[Message, ...]:
    """Renames every call id to its canonical form and remaps tool results to match.

    A tool message answers the most recent earlier call carrying its tool_call_id (ids may be
    reused across turns by clients that restart numbering per message). A tool_call_id with no
    earlier call is a ChatFormatError: there is no call to attach the result to.
    """
    renamed: dict[str, str] = {}
    index = 0
    out: list[Message] = []
    for i, message in enumerate(messages):
        if message.tool_calls:
            calls = []
            for call in message.tool_calls:
                new_id = canonical_id(call.name, index)
                renamed[call.id] = new_id
                calls.append(replace(call, id=new_id))
                index += 1
            message = replace(message, tool_calls=tuple(calls))
        elif message.role == "tool":
            new_id = renamed.get(message.tool_call_id or "")
            if new_id is None:
                raise ChatFormatError(
                    f"messages[{i}].tool_call_id: {message.tool_call_id!r} matches no earlier "
                    "assistant tool call"
                )
            message = replace(message, tool_call_id=new_id)
        out.append(message)
    return tuple(out)
