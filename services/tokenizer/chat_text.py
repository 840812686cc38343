"""The model's text layer as the tokenizer service holds it: vocabulary, chat format, context.

Built from a checkpoint directory. The chat format is the checkpoint's by default: its own Jinja
template when it ships one (chat_template.jinja or tokenizer_config.json's chat_template),
otherwise the native renderer, flavor "k2-thinking" when the tokenizer has <think> tokens and
"k2-instruct" when not. Either way the rendered prompt is a list of (text, is_control) segments
and only control segments become control ids, so user text never does.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from jinja2 import TemplateError

from k2model.config import K2Config
from k2model.text import chat_tokens
from k2model.text.chat_format import Flavor, Segment, control_tokens, render
from k2model.text.hf_tokenizer import HFTokenizer
from k2model.text.jinja_template import (
    JinjaChatTemplate,
    load_checkpoint_template,
    sorts_tool_keys,
)
from k2model.text.messages import ChatFormatError, Message, Tool
from k2model.text.tokenizer import Tokenizer
from services.common.errors import InvalidArgument

ChatFormat = Literal["checkpoint", Flavor]
CHAT_FORMATS: tuple[str, ...] = ("checkpoint", *get_args(Flavor))

# messages, tools, add_generation_prompt, keep_reasoning -> segments
Renderer = Callable[[Sequence[Message], Sequence[Tool], bool, bool], list[Segment]]


@dataclass(frozen=True)
class Rendered:
    prompt_ids: list[int]
    prompt_text: str
    stop_ids: list[int]  # the model's end-of-turn ids


def native_flavor(tokenizer: Tokenizer) -> Flavor:
    """K2-Thinking's vocabulary names <think>; K2-Instruct's leaves that id reserved."""
    return "k2-thinking" if tokenizer.has_special(chat_tokens.THINK_BEGIN) else "k2-instruct"


def template_controls(tokenizer: Tokenizer) -> frozenset[str]:
    """The names a checkpoint template's markup turns into control ids: K2's flavor's for K2's
    tokenizer, every added token of an HF one (its own template's markup)."""
    if isinstance(tokenizer, HFTokenizer):
        return tokenizer.control_names
    return control_tokens(native_flavor(tokenizer))


def _make_renderer(chat_format: ChatFormat, checkpoint: Path, tokenizer: Tokenizer) -> Renderer:
    if chat_format != "checkpoint":
        native = functools.partial(render, flavor=chat_format)
        return lambda messages, tools, gen, keep: native(
            messages, tools, add_generation_prompt=gen, keep_reasoning=keep
        )
    template = load_checkpoint_template(checkpoint)
    if template is None:
        raise ValueError("chat_format 'checkpoint': the checkpoint ships no chat template")
    jinja = JinjaChatTemplate(
        template,
        control_tokens=template_controls(tokenizer),
        special_tokens=tokenizer.special_tokens_map,
        sort_tool_keys=sorts_tool_keys(checkpoint),
    )

    def render_template(
        messages: Sequence[Message], tools: Sequence[Tool], gen: bool, keep: bool
    ) -> list[Segment]:
        if keep:
            raise InvalidArgument(
                "thinking.keep: this checkpoint's chat template decides which reasoning it "
                "keeps; keeping all of it needs the native chat format (chat_format: k2-thinking)"
            )
        return jinja.render(messages, tools, add_generation_prompt=gen)

    return render_template


class ChatText:
    def __init__(self, checkpoint: str | Path, chat_format: ChatFormat | None = None) -> None:
        if chat_format is not None and chat_format not in CHAT_FORMATS:
            raise ValueError(f"chat_format must be one of {CHAT_FORMATS}, got {chat_format!r}")
        self.tokenizer = Tokenizer.from_dir(checkpoint)
        config = K2Config.from_dir(checkpoint)
        self.context, self.vocab_size = config.max_position_embeddings, config.vocab_size
        # Model rows past the tokenizer's ids (a padded embedding: DeepSeek-V3 has 129,280 rows
        # for 128,815 tokens) have no text; they are never sampled. K2's tokenizer covers all.
        self.unmapped_ids = range(min(self.tokenizer.vocab_size, self.vocab_size), self.vocab_size)
        if chat_format is None:
            shipped = load_checkpoint_template(checkpoint) is not None
            chat_format = "checkpoint" if shipped else native_flavor(self.tokenizer)
        if chat_format != "checkpoint":
            missing = sorted(
                n for n in control_tokens(chat_format) if not self.tokenizer.has_special(n)
            )
            if missing:
                raise ValueError(
                    f"chat_format {chat_format}: the tokenizer has no {', '.join(missing[:4])}"
                    " (a checkpoint without K2's chat tokens needs its own chat template)"
                )
        self.chat_format: ChatFormat = chat_format
        self.reasoning = self.tokenizer.has_special(chat_tokens.THINK_BEGIN)
        self._render = _make_renderer(chat_format, Path(checkpoint), self.tokenizer)
        self._stop_ids = sorted(self.tokenizer.stop_ids)

    def render(
        self,
        messages: Sequence[Message],
        tools: Sequence[Tool],
        add_generation_prompt: bool,
        keep_reasoning: bool = False,
    ) -> Rendered:
        try:
            segments = self._render(messages, tools, add_generation_prompt, keep_reasoning)
        except (ChatFormatError, TemplateError) as e:
            raise InvalidArgument(f"chat format: {e}") from None
        return Rendered(
            prompt_ids=self.tokenizer.encode_segments(segments),
            prompt_text="".join(text for text, _ in segments),
            stop_ids=self._stop_ids,
        )
