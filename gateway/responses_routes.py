"""The OpenAI Responses API: `POST /v1/responses` (one JSON response, or its typed SSE events),
`GET` and `DELETE /v1/responses/{id}` for stored responses.

Same pipeline as chat completions (one choice): ResponsesRequest -> ChatRequest -> ChatService
-> settled events -> ResponseBuilder. `previous_response_id` continues a stored response's
conversation (its turns and output; not its instructions, as OpenAI). A response is stored
unless `store` is false, when it has finished; a stream stores it at response.completed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from gateway import errors
from gateway.auth import ApiKey, Key
from gateway.field_policy import ignored_fields
from gateway.responses_models import ResponsesRequest
from gateway.responses_output import ResponseBuilder, new_id
from gateway.serving import Gateway, Generation, gateway_of
from gateway.sse import EventStream, cancel_on_disconnect, event_frame

router = APIRouter()
ROUTE = "/v1/responses"


def _not_found(response_id: str, param: str | None = None) -> errors.ApiError:
    return errors.ApiError(
        404, f"Response with id '{response_id}' not found.", code="not_found", param=param
    )


def _echo(body: ResponsesRequest, model_id: str) -> dict[str, Any]:
    """The request fields a response object repeats."""
    fmt = body.text.format if body.text is not None and body.text.format is not None else None
    return {
        "model": model_id,
        "instructions": body.instructions,
        "max_output_tokens": body.max_output_tokens,
        "parallel_tool_calls": body.parallel_tool_calls is not False,
        "previous_response_id": body.previous_response_id,
        "reasoning": {
            "effort": body.reasoning.effort if body.reasoning else None,
            "summary": None,
        },
        "store": body.store is not False,
        "temperature": body.temperature,
        "text": {
            "format": fmt.model_dump(by_alias=True, exclude_none=True) if fmt else {"type": "text"}
        },
        "tool_choice": (
            body.tool_choice.model_dump()
            if body.tool_choice is not None and not isinstance(body.tool_choice, str)
            else body.tool_choice or "auto"
        ),
        "tools": [
            {**t.model_dump(), "strict": t.strict is not False} for t in body.function_tools()
        ],
        "top_p": body.top_p,
        "truncation": "disabled",
        "metadata": body.metadata or {},
        "user": None,
    }


@router.post(ROUTE)
async def create_response(body: ResponsesRequest, request: Request, key: Key) -> Response:
    gw = gateway_of(request)
    model = gw.resolve(key, body.model)
    history: tuple = ()
    if body.previous_response_id is not None:
        previous = gw.responses.get(key.name, body.previous_response_id)
        if previous is None:
            raise _not_found(body.previous_response_id, "previous_response_id")
        history = previous.conversation
    chat = body.to_chat_request(model, gw.default_thinking(model), gw.config.limits, history)
    for name in sorted(ignored_fields(body)):
        gw.metrics.ignored.labels(ROUTE, name).inc()
    builder = ResponseBuilder(new_id("resp"), _echo(body, model.id))
    request.state.completion_id = builder.id
    gen = await cancel_on_disconnect(request, gw.start(chat, builder.id))
    prompt_turns = chat.messages[1:] if body.instructions is not None else chat.messages

    def store() -> None:
        if body.store is not False:
            conversation = (*prompt_turns, builder.assistant_turn())
            gw.responses.put(key.name, builder.response(builder.status()), conversation)

    if body.stream:
        return EventStream(_events(gen, builder, store), gen.close)
    try:
        await cancel_on_disconnect(request, _run(gen, builder))
    finally:
        await gen.close()
    builder.finish()
    store()
    return JSONResponse(builder.response(builder.status()))


async def _run(gen: Generation, builder: ResponseBuilder) -> None:
    async for event in gen:
        builder.feed(event)


async def _events(gen: Generation, builder: ResponseBuilder, store) -> AsyncIterator[bytes]:
    try:
        for event in builder.start():
            yield event_frame(event["type"], event)
        async for chat_event in gen:
            for event in builder.feed(chat_event):
                yield event_frame(event["type"], event)
        final = builder.finish()
        store()
        for event in final:
            yield event_frame(event["type"], event)
    except Exception as exc:
        error = errors.from_exception(exc)
        yield event_frame(
            "error",
            {
                "type": "error",
                "code": error.code,
                "message": error.message,
                "param": error.param,
                "sequence_number": builder.sequence,
            },
        )


def _owned(gw: Gateway, key: ApiKey, response_id: str) -> dict[str, Any]:
    stored = gw.responses.get(key.name, response_id)
    if stored is None:
        raise _not_found(response_id)
    return stored.body


@router.get(ROUTE + "/{response_id}")
async def retrieve_response(response_id: str, request: Request, key: Key) -> dict[str, Any]:
    return _owned(gateway_of(request), key, response_id)


@router.delete(ROUTE + "/{response_id}")
async def delete_response(response_id: str, request: Request, key: Key) -> dict[str, Any]:
    gw = gateway_of(request)
    if not gw.responses.delete(key.name, response_id):
        raise _not_found(response_id)
    return {"id": response_id, "object": "response.deleted", "deleted": True}
