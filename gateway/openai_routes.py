"""The OpenAI-compatible routes: chat completions, completions, models, and Moonshot's
token-count endpoint. Each handler: key (dependency) -> model -> ChatRequest -> ChatService ->
one JSON body or an SSE stream."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

from gateway import openai_responses as out
from gateway.auth import Key
from gateway.events import collect
from gateway.field_policy import ignored_fields
from gateway.merged import MergedGeneration, start_all
from gateway.openai_models import ChatCompletionRequest, CompletionRequest
from gateway.serving import Gateway, Generation, gateway_of
from gateway.sse import EventStream, cancel_on_disconnect

router = APIRouter()


async def _respond(
    request: Request,
    gen: Generation | MergedGeneration,
    env: out.Envelope,
    n: int,
    stream: bool,
    include_usage: bool,
    logprobs: bool,
    continuous: bool = False,
) -> Response:
    if stream:
        chunks = out.chat_chunks if env.object == "chat.completion.chunk" else out.completion_chunks
        frames = chunks(env, aiter(gen), include_usage, logprobs, continuous)
        return EventStream(frames, gen.close)
    try:
        choices, usage = await cancel_on_disconnect(request, collect(aiter(gen), n))
    finally:
        await gen.close()
    build = out.chat_completion if env.object == "chat.completion" else out.completion
    return JSONResponse(build(env, choices, usage, logprobs))


def _count_ignored(gw: Gateway, route: str, body: BaseModel) -> None:
    for field in sorted(ignored_fields(body)):
        gw.metrics.ignored.labels(route, field).inc()


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request, key: Key) -> Response:
    gw = gateway_of(request)
    model = gw.resolve(key, body.model)
    chat = body.to_chat_request(model, gw.default_thinking(model), gw.config.limits)
    _count_ignored(gw, "/v1/chat/completions", body)
    kind = "chat.completion.chunk" if body.stream else "chat.completion"
    env = out.Envelope.new(kind, model.id, "chatcmpl")
    request.state.completion_id = env.id
    gen = await cancel_on_disconnect(request, gw.start(chat, env.id))
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return await _respond(
        request,
        gen,
        env,
        chat.n,
        bool(body.stream),
        include_usage,
        bool(body.logprobs),
        chat.continuous_usage,
    )


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request, key: Key) -> Response:
    gw = gateway_of(request)
    model = gw.resolve(key, body.model)
    chats = body.to_chat_requests(model, gw.config.limits)
    _count_ignored(gw, "/v1/completions", body)
    env = out.Envelope.new("text_completion", model.id, "cmpl")
    request.state.completion_id = env.id
    n = chats[0].n
    starts = [
        gw.start(chat, env.id if len(chats) == 1 else f"{env.id}-p{p}")
        for p, chat in enumerate(chats)
    ]
    gen = await cancel_on_disconnect(request, start_all(starts, n))
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return await _respond(
        request,
        gen,
        env,
        n * len(chats),
        bool(body.stream),
        include_usage,
        body.logprobs is not None,
        chats[0].continuous_usage,
    )


@router.post("/v1/tokenizers/estimate-token-count")
async def estimate_token_count(
    body: ChatCompletionRequest, request: Request, key: Key
) -> dict[str, Any]:
    """Moonshot's utility: the same body as a chat request -> its prompt's token count."""
    gw = gateway_of(request)
    model = gw.resolve(key, body.model)
    chat = body.to_chat_request(model, gw.default_thinking(model), gw.config.limits)
    total = await gw.services[model.id].count_tokens(chat)
    return {"data": {"total_tokens": total}}


def _model_card(model_id: str, owned_by: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": 0, "owned_by": owned_by}


@router.get("/v1/models")
async def list_models(request: Request, key: Key) -> dict[str, Any]:
    """The models this key may use, its profile's default first."""
    registry = gateway_of(request).config.registry
    allowed = [m for m in registry.models if key.profile.allows(m.id)]
    allowed.sort(key=lambda m: m.id != key.profile.default_model)
    return {"object": "list", "data": [_model_card(m.id, m.owned_by) for m in allowed]}


@router.get("/v1/models/{model_id:path}")
async def retrieve_model(model_id: str, request: Request, key: Key) -> dict[str, Any]:
    model = gateway_of(request).resolve(key, model_id)
    return _model_card(model.id, model.owned_by)
