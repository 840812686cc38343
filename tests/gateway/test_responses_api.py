"""The OpenAI Responses API (`/v1/responses`) over a scripted pipeline, through the official
openai SDK: input items -> the chat conversation, output items, the typed stream events, stored
responses with previous_response_id, and what is refused."""

from __future__ import annotations

import openai
import pytest

from k2model.text.messages import Message, ToolCall
from services.chat.types import ChatEvent, ResponseFormat, ToolCallDelta, Usage
from tests.gateway.rest_fakes import ENTERPRISE_KEY, ORDINARY_KEY, ScriptedChat
from tests.gateway.rest_server import HTTP, switched
from tests.gateway.test_limits import assert_openai_error

MODEL = "kimi-k2-instruct"
WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOL = {"type": "function", "name": "get_weather", "parameters": WEATHER}


@pytest.fixture(scope="module")
def serve():
    with switched() as use:
        yield use


def client(base: str, key: str = ORDINARY_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, http_client=HTTP)


def thinking_then_call(request) -> list[ChatEvent]:
    return [
        ChatEvent(reasoning="need the "),
        ChatEvent(reasoning="weather"),
        ChatEvent(content="Checking."),
        ChatEvent(
            tool_calls=(
                ToolCallDelta(0, "functions.get_weather:0", "get_weather", '{"city": "Paris"}'),
            )
        ),
        ChatEvent(finish_reason="tool_calls", usage=Usage(7, 9)),
    ]


def test_a_string_input_answers_with_one_message(serve) -> None:
    fake = ScriptedChat()
    response = client(serve(fake)).responses.create(
        model=MODEL, input="hello big world", instructions="Be brief.", max_output_tokens=50
    )
    [request] = fake.requests
    assert request.messages == (Message("system", "Be brief."), Message("user", "hello big world"))
    assert request.max_tokens == 50
    assert response.object == "response" and response.status == "completed"
    assert response.output_text == "hello big world"
    assert [item.type for item in response.output] == ["message"]
    assert (response.usage.input_tokens, response.usage.output_tokens) == (5, 3)
    assert response.instructions == "Be brief." and response.id.startswith("resp_")


def test_items_become_the_conversation(serve) -> None:
    fake = ScriptedChat()
    items = [
        {"role": "developer", "content": "Use tools."},
        {"role": "user", "content": [{"type": "input_text", "text": "Weather in Paris?"}]},
        {
            "type": "reasoning",
            "id": "rs_1",
            "summary": [],
            "content": [{"type": "reasoning_text", "text": "look it up"}],
        },
        {
            "type": "message",
            "role": "assistant",
            "content": [{"type": "output_text", "text": "Checking.", "annotations": []}],
        },
        {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{}"},
        {"type": "function_call", "call_id": "c2", "name": "get_weather", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
        {"type": "function_call_output", "call_id": "c2", "output": "rainy"},
    ]
    client(serve(fake)).responses.create(model=MODEL, input=items, tools=[TOOL])
    [request] = fake.requests
    calls = (ToolCall("c1", "get_weather", "{}"), ToolCall("c2", "get_weather", "{}"))
    assert request.messages == (
        Message("system", "Use tools."),
        Message("user", "Weather in Paris?"),
        Message("assistant", "Checking.", tool_calls=calls, reasoning_content="look it up"),
        Message("tool", "sunny", tool_call_id="c1"),
        Message("tool", "rainy", tool_call_id="c2"),
    )
    assert request.strict_tools == {"get_weather"}  # function tools are strict by default


def test_reasoning_text_and_calls_are_output_items(serve) -> None:
    fake = ScriptedChat(script=thinking_then_call)
    response = client(serve(fake)).responses.create(model=MODEL, input="x", tools=[TOOL])
    reasoning, message, call = response.output
    assert reasoning.type == "reasoning" and reasoning.content[0].text == "need the weather"
    assert message.type == "message" and message.content[0].text == "Checking."
    assert (call.type, call.name, call.call_id) == (
        "function_call",
        "get_weather",
        "functions.get_weather:0",
    )
    assert call.arguments == '{"city": "Paris"}' and response.status == "completed"


def test_stream_events_follow_openai_s_sequence(serve) -> None:
    fake = ScriptedChat(script=thinking_then_call)
    events = list(
        client(serve(fake)).responses.create(model=MODEL, input="x", tools=[TOOL], stream=True)
    )
    kinds = [e.type for e in events]
    assert kinds[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert kinds[-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == (
        "need the weather"
    )
    assert [e.delta for e in events if e.type == "response.output_text.delta"] == ["Checking."]
    [args] = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert args.arguments == '{"city": "Paris"}'
    added = [e.item.type for e in events if e.type == "response.output_item.added"]
    done = [e.item.type for e in events if e.type == "response.output_item.done"]
    assert added == done == ["reasoning", "message", "function_call"]
    final = events[-1].response
    assert [i.type for i in final.output] == added and final.usage.output_tokens == 9


def test_a_cut_output_is_incomplete(serve) -> None:
    fake = ScriptedChat(
        script=lambda _: [ChatEvent(content="abc"), ChatEvent(finish_reason="length")]
    )
    response = client(serve(fake)).responses.create(model=MODEL, input="x", max_output_tokens=1)
    assert response.status == "incomplete"
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.output[0].status == "incomplete"


def test_previous_response_id_continues_the_stored_conversation(serve) -> None:
    fake = ScriptedChat(script=thinking_then_call)
    base = serve(fake)
    first = client(base).responses.create(
        model=MODEL, input="Weather?", instructions="Be brief.", tools=[TOOL]
    )
    fake.script = ScriptedChat().script
    second = client(base).responses.create(
        model=MODEL,
        previous_response_id=first.id,
        input=[
            {"type": "function_call_output", "call_id": first.output[2].call_id, "output": "sun"}
        ],
        tools=[TOOL],
    )
    follow_up = fake.requests[-1]
    call = ToolCall("functions.get_weather:0", "get_weather", '{"city": "Paris"}')
    assert follow_up.messages == (
        Message("user", "Weather?"),  # the instructions are not carried over
        Message("assistant", "Checking.", tool_calls=(call,), reasoning_content="need the weather"),
        Message("tool", "sun", tool_call_id="functions.get_weather:0"),
    )
    assert second.previous_response_id == first.id
    assert client(base).responses.retrieve(first.id).id == first.id
    with pytest.raises(openai.NotFoundError):
        client(base, ENTERPRISE_KEY).responses.retrieve(first.id)  # another key's: missing
    client(base).responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        client(base).responses.retrieve(first.id)
    with pytest.raises(openai.NotFoundError) as missing:
        client(base).responses.create(model=MODEL, input="x", previous_response_id=first.id)
    assert missing.value.body["param"] == "previous_response_id"


def test_store_false_keeps_nothing(serve) -> None:
    base = serve(ScriptedChat())
    response = client(base).responses.create(model=MODEL, input="x", store=False)
    with pytest.raises(openai.NotFoundError):
        client(base).responses.retrieve(response.id)


def test_output_controls_are_honoured(serve) -> None:
    fake = ScriptedChat()
    base = serve(fake)
    client(base).responses.create(
        model=MODEL,
        input="x",
        text={"format": {"type": "json_schema", "name": "w", "schema": WEATHER, "strict": True}},
        tools=[{**TOOL, "strict": False}],
        tool_choice={"type": "function", "name": "get_weather"},
        parallel_tool_calls=False,
    )
    client(base, ENTERPRISE_KEY).responses.create(
        model="kimi-k2-thinking", input="x", reasoning={"effort": "minimal", "summary": "auto"}
    )
    structured, effort = fake.requests
    assert structured.response_format == ResponseFormat(WEATHER)
    assert structured.strict_tools == frozenset() and structured.tool_choice == "get_weather"
    assert structured.parallel_tool_calls is False
    assert effort.thinking is False


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"background": True}, "background"),
        ({"truncation": "auto"}, "truncation"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
            "input[0].message",
        ),
        ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format"),
        ({"frobnicate": 1}, "frobnicate"),
    ],
)
def test_refusals_name_the_field(serve, fields, param) -> None:
    fake = ScriptedChat()
    body = {"model": MODEL, "input": "x", **fields}
    response = HTTP.post(
        f"{serve(fake)}/v1/responses",
        json=body,
        headers={"Authorization": f"Bearer {ORDINARY_KEY}"},
    )
    assert_openai_error(response, 400, param)
    assert not fake.requests
