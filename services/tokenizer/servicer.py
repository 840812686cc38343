"""The k2.v1.Tokenizer servicer: chat rendering, encoding and streaming detokenization.

Built from a checkpoint directory. The chat format is the checkpoint's by default: its own Jinja
template when it ships one (chat_template.jinja or tokenizer_config.json's chat_template),
otherwise the native renderer, flavor "k2-thinking" when the tokenizer has <think> tokens and
"k2-instruct" when not. Either way the rendered prompt is a list of (text, is_control) segments
and only control segments become control ids, so user text never does.

Render and Encode run in a worker thread: a long prompt must not stall the event loop that
serves every Detokenize stream.

Detokenize replies once per `ids` message and once more after the client half-closes (the
flush), so a client may write a message and then read its reply in lockstep. The `start`
message gets no reply.
"""

import asyncio
import functools
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Literal, get_args

import grpc
from jinja2 import TemplateError

from k2model.text import chat_tokens
from k2model.text.chat_format import Flavor, Segment, control_tokens, render
from k2model.text.jinja_template import (
    JinjaChatTemplate,
    load_checkpoint_template,
    sorts_tool_keys,
)
from k2model.text.messages import ChatFormatError, Message, Tool
from k2model.text.tokenizer import Tokenizer
from services.common.errors import InvalidArgument
from services.pb.k2.v1 import tokenizer_pb2, tokenizer_pb2_grpc
from services.tokenizer.convert import (
    messages_from_proto,
    options_from_proto,
    output_to_proto,
    tools_from_proto,
)
from services.tokenizer.detokenize_session import DetokenizeSession

ChatFormat = Literal["checkpoint", Flavor]
CHAT_FORMATS: tuple[str, ...] = ("checkpoint", *get_args(Flavor))
SERVICE_NAME = tokenizer_pb2.DESCRIPTOR.services_by_name["Tokenizer"].full_name

# messages, tools, add_generation_prompt -> segments
Renderer = Callable[[Sequence[Message], Sequence[Tool], bool], list[Segment]]


def native_flavor(tokenizer: Tokenizer) -> Flavor:
    """K2-Thinking's vocabulary names <think>; K2-Instruct's leaves that id reserved."""
    try:
        tokenizer.special_id(chat_tokens.THINK_BEGIN)
    except ValueError:
        return "k2-instruct"
    return "k2-thinking"


def _make_renderer(chat_format: ChatFormat, checkpoint: Path, tokenizer: Tokenizer) -> Renderer:
    if chat_format != "checkpoint":
        native = functools.partial(render, flavor=chat_format)
        return lambda messages, tools, gen: native(messages, tools, add_generation_prompt=gen)
    template = load_checkpoint_template(checkpoint)
    if template is None:
        raise ValueError("chat_format 'checkpoint': the checkpoint ships no chat template")
    jinja = JinjaChatTemplate(
        template,
        control_tokens=control_tokens(native_flavor(tokenizer)),
        sort_tool_keys=sorts_tool_keys(checkpoint),
    )
    return lambda messages, tools, gen: jinja.render(messages, tools, add_generation_prompt=gen)


class TokenizerServicer(tokenizer_pb2_grpc.TokenizerServicer):
    def __init__(self, checkpoint: str | Path, chat_format: ChatFormat | None = None):
        if chat_format is not None and chat_format not in CHAT_FORMATS:
            raise ValueError(f"chat_format must be one of {CHAT_FORMATS}, got {chat_format!r}")
        self._tokenizer = Tokenizer.from_dir(checkpoint)
        if chat_format is None:
            shipped = load_checkpoint_template(checkpoint) is not None
            chat_format = "checkpoint" if shipped else native_flavor(self._tokenizer)
        self.chat_format: ChatFormat = chat_format
        self._render = _make_renderer(chat_format, Path(checkpoint), self._tokenizer)
        self._stop_ids = sorted(self._tokenizer.stop_ids)

    async def Render(
        self, request: tokenizer_pb2.RenderRequest, context: grpc.aio.ServicerContext
    ) -> tokenizer_pb2.RenderReply:
        messages = messages_from_proto(request.messages)
        tools = tools_from_proto(request.tools)
        return await asyncio.to_thread(
            self.render_reply, messages, tools, request.add_generation_prompt
        )

    def render_reply(
        self, messages: Sequence[Message], tools: Sequence[Tool], add_generation_prompt: bool
    ) -> tokenizer_pb2.RenderReply:
        try:
            segments = self._render(messages, tools, add_generation_prompt)
        except (ChatFormatError, TemplateError) as e:
            raise InvalidArgument(f"chat format: {e}") from None
        return tokenizer_pb2.RenderReply(
            prompt_ids=self._tokenizer.encode_segments(segments),
            prompt_text="".join(text for text, _ in segments),
            stop_ids=self._stop_ids,
        )

    async def Encode(
        self, request: tokenizer_pb2.EncodeRequest, context: grpc.aio.ServicerContext
    ) -> tokenizer_pb2.EncodeReply:
        ids = await asyncio.to_thread(self._tokenizer.encode, request.text)
        return tokenizer_pb2.EncodeReply(ids=ids)

    async def Detokenize(
        self,
        request_iterator: AsyncIterator[tokenizer_pb2.DetokenizeInput],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[tokenizer_pb2.DetokenizeOutput]:
        first = await anext(request_iterator, None)
        if first is None or first.WhichOneof("part") != "start":
            raise InvalidArgument("Detokenize: the first message must carry start")
        session = DetokenizeSession(self._tokenizer, options_from_proto(first.start))
        async for message in request_iterator:
            if message.WhichOneof("part") != "ids":
                raise InvalidArgument("Detokenize: after start, every message must carry ids")
            yield output_to_proto(session.push(message.ids.ids))
        yield output_to_proto(session.finish())
