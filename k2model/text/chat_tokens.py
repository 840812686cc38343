"""The control-token names of K2's chat format and of its tool-call / reasoning output.

Names only (ids belong to the tokenizer, see specials.py). The renderer emits them as control
segments; the output parsers look for them in detokenized text, where the tool-call markers and
<think> / </think> survive a skip-special decode (they are not flagged special, docs/text.md, special tokens).
"""

IM_SYSTEM = "<|im_system|>"
IM_USER = "<|im_user|>"
IM_ASSISTANT = "<|im_assistant|>"
IM_MIDDLE = "<|im_middle|>"
IM_END = "<|im_end|>"

SECTION_BEGIN = "<|tool_calls_section_begin|>"
SECTION_END = "<|tool_calls_section_end|>"
CALL_BEGIN = "<|tool_call_begin|>"
ARG_BEGIN = "<|tool_call_argument_begin|>"
CALL_END = "<|tool_call_end|>"

# The model sometimes writes the section markers in the singular, as plain text (docs/text.md, tool calls).
SECTION_BEGIN_SINGULAR = "<|tool_call_section_begin|>"
SECTION_END_SINGULAR = "<|tool_call_section_end|>"

THINK_BEGIN = "<think>"
THINK_END = "</think>"

# Image placeholder of every K2 template. "<|media_start|>" is not a token of any K2 vocabulary
# (the token is <|media_begin|>), so it is always plain text (docs/text.md, special tokens).
MEDIA_START = "<|media_start|>"
MEDIA_CONTENT = "<|media_content|>"
MEDIA_PAD = "<|media_pad|>"
MEDIA_END = "<|media_end|>"

_CHAT_CONTROLS = frozenset(
    {IM_SYSTEM, IM_USER, IM_ASSISTANT, IM_MIDDLE, IM_END}
    | {SECTION_BEGIN, SECTION_END, CALL_BEGIN, ARG_BEGIN, CALL_END}
)

# Names that are added tokens of each flavor's tokenizer, i.e. what HF's tokenizer splits out of
# rendered text. Media and think names exist only in K2-Thinking's tokenizer_config.json; in the
# Instruct vocabularies the same strings are ordinary text.
INSTRUCT_CONTROLS = _CHAT_CONTROLS
THINKING_CONTROLS = _CHAT_CONTROLS | {THINK_BEGIN, THINK_END, MEDIA_CONTENT, MEDIA_PAD, MEDIA_END}
